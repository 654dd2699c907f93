"""Registers, spills and shared memory of the SALS kernels on sm_90, compiled offline (no GPU needed): the fused decode
kernel in every launch-setting variant, then the radix select's and the split combine's kernels.

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
from kernels import sals_decode, topk  # noqa: E402

POINTERS = dict(q_ptr="*bf16", sink_k_ptr="*bf16", sink_v_ptr="*bf16", win_k_ptr="*bf16", win_v_ptr="*bf16",
                win_pos_ptr="*i32", pos_ptr="*i64", idx_ptr="*i64", keep_ptr="*i1", kls_ptr="*bf16", klr_ptr="*bf16",
                u_ptr="*bf16", rope_ptr="*fp32", vq_ptr="*u8", vs_ptr="*bf16", vz_ptr="*bf16", m_ptr="*fp32",
                l_ptr="*fp32", acc_ptr="*fp32")
SHAPES = {"mha": dict(G=1, RS=256, RR=256), "gqa": dict(G=4, RS=64, RR=64)}


# the other kernels of a step at Mistral-7B 32K, B=8 (S = 32768 + 32, k = 4020, 65 splits), with the constexprs
# kernels/topk.launch_select and sals_decode.launch_combine derive: kernel, pointer types, constexprs
S, K, N_SPLIT = 32800, 4020, 65
N_CHUNK = triton.cdiv(S, topk.CHUNK)
SELECT = dict(S=S, K=K, CHUNK=topk.CHUNK)
OTHERS = [(topk._histogram_kernel, dict(s_ptr="*fp32", n_ptr="*i32", hist_ptr="*i32"), dict(SELECT, PASS=p))
          for p in range(4)] + [
    (topk._count_kernel, dict(s_ptr="*fp32", n_ptr="*i32", hist_ptr="*i32", cnt_ptr="*i32"),
     dict(SELECT, N_CHUNK=N_CHUNK)),
    (topk._write_kernel, dict(s_ptr="*fp32", n_ptr="*i32", hist_ptr="*i32", cnt_ptr="*i32", idx_ptr="*i64",
                              keep_ptr="*i1"),
     dict(SELECT, N_CHUNK=N_CHUNK, N_POW=triton.next_power_of_2(N_CHUNK), K_PER=triton.cdiv(K, N_CHUNK))),
    (sals_decode._combine_kernel, dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*bf16"),
     dict(N=N_SPLIT, N_P=triton.next_power_of_2(N_SPLIT), HD=128, BLOCK=16))]


def compile_sm90(cfg: dict, G: int, RS: int, RR: int):
    """The fused kernel compiled for sm_90 with launch settings cfg (as in sals_decode.CONFIGS)."""
    consts = dict(qk_scale=128 ** -0.5 * math.log2(math.e), G=G, HD=128, N_SINK=16, W=64, RS=RS, RR=RR, BITS=2,
                  TPS=4 * cfg["block_n"], HEADS=cfg["heads"], BLOCK_Q=max(16, triton.next_power_of_2(cfg["heads"] * G)),
                  BLOCK_N=cfg["block_n"], BLOCK_R=sals_decode.latent_block(RS, RR, cfg["block_r"]), PREC="tf32")
    return compile_kernel(sals_decode._sals_decode_kernel, POINTERS, consts, cfg["num_warps"], cfg["num_stages"],
                          aligned_ints=("R",))


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
        k = compile_kernel(fn, pointers, consts)
        name = " ".join(f"{key}={val}" for key, val in consts.items())
        print(f"{fn.__name__} {name}: {k.metadata.shared} B shared; {ptxas_report(k.asm['ptx'])}", flush=True)


if __name__ == "__main__":
    main()
