"""Registers, spills and shared memory of the SALS kernels on sm_90, compiled offline (no GPU needed): the fused decode
kernel in every launch-setting variant, then the scoring, selection and split-combine kernels.

    python bench/kernel_report.py                 # every launch-setting variant of attention_bench.SWEEP
    python bench/kernel_report.py --ttgir out.mlir   # also writes the first variant's TTGIR (look for tt.load:
                                                    # a synchronous load where an async copy was meant)

Triton compiles the kernel for an H100 (sm_90) on any machine and its bundled ptxas reports the resources. The
shapes are the benchmark's: Llama-2-7B (MHA, r* = r - r* = 256) and Mistral-7B (GQA G = 4, r* = 64), SALS-12.5%
(2-bit values), head_dim 128, 16 sinks, a 64-token window, bf16. Registers decide how many programs an SM holds:
more than 128 per thread at 8 warps (or 255 at 4) leaves one program per SM.
"""
import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention_bench import SWEEP  # noqa: E402
from kernels import latent_score, sals_decode, topk  # noqa: E402

POINTERS = dict(q_ptr="*bf16", sink_k_ptr="*bf16", sink_v_ptr="*bf16", win_k_ptr="*bf16", win_v_ptr="*bf16",
                win_pos_ptr="*i32", pos_ptr="*i64", idx_ptr="*i64", keep_ptr="*i1", kls_ptr="*bf16", klr_ptr="*bf16",
                u_ptr="*bf16", rope_ptr="*fp32", vq_ptr="*u8", vs_ptr="*bf16", vz_ptr="*bf16", m_ptr="*fp32",
                l_ptr="*fp32", acc_ptr="*fp32")
SHAPES = {"mha": dict(G=1, RS=256, RR=256), "gqa": dict(G=4, RS=64, RR=64)}


# the other kernels of a step at Mistral-7B 32K, B=8 (S = 32768 + 32, k = 4020, 65 splits), with the constexprs
# kernels/latent_score, kernels/topk.launch_select and sals_decode.launch_combine derive: kernel, pointer types,
# constexprs. Scoring: one query per layer; one per KV head and distance bucket (Mistral-7B: 8 KV heads, 9 buckets;
# Llama-2-7B: 32 KV heads, 10 buckets, r* = 256).
S, K, N_SPLIT = 32800, 4020, 65
NC = triton.cdiv(S, topk.CHUNK)
SCORE_POINTERS = dict(k_ptr="*bf16", q_ptr="*bf16", pos_ptr="*i64", out_ptr="*fp32", hist_ptr="*i32")
# integer arguments that are multiples of 16 at these shapes, as Triton specializes them at launch (unmarked, the
# scoring kernel's loads compile unvectorized: many more registers than it uses on the GPU)
ALIGNED_INTS = ("S", "n_sink", "window", "stride_kb", "stride_ks", "stride_qb", "stride_qn", "stride_qq", "stride_h")
OTHERS = [
    (latent_score._latent_score_kernel, SCORE_POINTERS,
     dict(RS=64, NB=1, NQ=1, NQP=16, BLOCK_S=128, BLOCK_R=64, DOT=True, UPCAST=False, PREC="tf32")),
    (latent_score._latent_score_kernel, SCORE_POINTERS,
     dict(RS=64, NB=9, NQ=8, NQP=16, BLOCK_S=128, BLOCK_R=64, DOT=True, UPCAST=False, PREC="tf32")),
    (latent_score._latent_score_kernel, SCORE_POINTERS,
     dict(RS=256, NB=10, NQ=32, NQP=32, BLOCK_S=128, BLOCK_R=64, DOT=True, UPCAST=False, PREC="tf32")),
    (topk._select_kernel, dict(s_ptr="*fp32", st_ptr="*i32", budget_ptr="*i32", idx_ptr="*i64", keep_ptr="*i1"),
     dict(NC=NC, NC_P=triton.next_power_of_2(NC), CHUNK=topk.CHUNK, K_PER=triton.cdiv(K, NC),
          K_PER_P=triton.next_power_of_2(triton.cdiv(K, NC)))),
    (sals_decode._combine_kernel, dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*bf16"),
     dict(N=N_SPLIT, N_P=triton.next_power_of_2(N_SPLIT), HD=128, BLOCK=16))]


def compile_sm90(cfg: dict, G: int, RS: int, RR: int):
    """The fused kernel compiled for sm_90 with launch settings cfg (as in sals_decode.CONFIGS)."""
    one_shot = max(RS, RR) <= cfg["block_r"]
    consts = dict(qk_scale=128 ** -0.5 * math.log2(math.e), HKV=32 // G, NQ=1, G=G, HD=128, N_SINK=16, W=64, RS=RS,
                  RR=RR, BITS=2, TPS=4 * cfg["block_n"], BLOCK_Q=max(16, triton.next_power_of_2(G)),
                  BLOCK_N=cfg["block_n"], ONE_SHOT=one_shot, N_EXACT=512, PREC="tf32",
                  BLOCK_R=max(16, triton.next_power_of_2(max(RS, RR))) if one_shot else
                  sals_decode.latent_block(RS, RR, cfg["block_r"]))
    return compile_kernel(sals_decode._sals_decode_kernel, POINTERS, consts, cfg["num_warps"], cfg["num_stages"])


def compile_kernel(fn, pointers: dict, consts: dict, num_warps: int = 4, num_stages: int = 3, aligned_ints=()):
    """fn compiled for sm_90: pointers (name: Triton type) 16-byte aligned, consts the constexprs, the rest int32."""
    names = fn.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in consts else "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in aligned_ints}
    src = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                num_stages=num_stages))


def ptxas_report(ptx: str) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True)
    lines = [line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "registers" in line or "spill" in line]
    return "; ".join(lines) or r.stderr.strip()[-200:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttgir", type=Path, help="write the first variant's TTGIR here")
    args = p.parse_args(argv)
    for family, variants in SWEEP.items():
        for n, cfg in enumerate(variants):
            k = compile_sm90(cfg, **SHAPES[family])
            if args.ttgir and family == "mha" and n == 0:
                args.ttgir.write_text(k.asm["ttgir"])
            name = " ".join(f"{key}={val}" for key, val in cfg.items())
            print(f"{family} {name}: {k.metadata.shared} B shared; {ptxas_report(k.asm['ptx'])}", flush=True)
    for fn, pointers, consts in OTHERS:
        k = compile_kernel(fn, pointers, consts, aligned_ints=ALIGNED_INTS)
        name = " ".join(f"{key}={val}" for key, val in consts.items())
        print(f"{fn.__name__} {name}: {k.metadata.shared} B shared; {ptxas_report(k.asm['ptx'])}", flush=True)


if __name__ == "__main__":
    main()
