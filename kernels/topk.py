"""SALS step 4 in one Triton launch: each ranking row's top tokens within its budget, without a sort.

The rule (exact and deterministic; kernels/ranking.py, its PyTorch reference): row (b, q) takes the
n = min(budget[b], k, #candidates) candidates (scores above -inf) with the best ranking keys (the float32 score cut
to bfloat16's precision), and among equal keys the earliest positions.

    idx (B, NQ, k) int64: the selected positions first, ascending, then 0; keep (B, NQ, k) bool: which are selected.

select_top scores (kernels/latent_score.py, which also counts the keys' top 8 bits in 256 coarse bins per row) and
selects. From the coarse bins, a cumulative sum from the top gives the coarse bin of the n-th key. Each chunk of
CHUNK scores of a row then gets two programs of the one launch:
  1. the fine histogram: its keys in that coarse bin counted by their low 8 bits, added to the row's 256 fine bins;
     then it signs in;
  2. when all of the row's first programs have signed in: the threshold key T (the fine bin of the n-th key) and
     need_eq (how many keys equal to T are taken: the earliest), its chunk's counts of keys above T and equal to T
     published in one word with a ready bit, the counts of the chunks before it summed once they are all ready
     (decoupled look-back), and its selected positions written after theirs.
Each program takes its role and chunk from a ticket counter of its row (an atomic add) and waits only on programs of
the same row with smaller tickets, which have started and never wait on a later one: whatever order the GPU starts
programs in, the smallest unfinished ticket can always run, so the launch cannot deadlock; Triton's interpreter runs
programs one after another in ticket order and never waits. All the state these programs share (coarse and fine
bins, counters, look-back words) is one int32 tensor that select_top allocates zeroed for every call (one memset),
so a step re-run at the same position starts from zeros like the first.

    python -m kernels.topk          # micro-benchmark on a GPU against torch.topk
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.latent_score import _desc16, launch_latent_scores, query_shape
from kernels.ranking import select_top_reference

CHUNK = 1024  # scores per program
# A row of the select state (int32): coarse bins, fine bins, ticket and arrival counters (each in its own 32-byte
# sector: they take atomics), then one look-back word per chunk: READY | (keys above T) << 15 | (keys equal to T).
COARSE, FINE, TICKET, ARRIVE, WORDS = tl.constexpr(0), tl.constexpr(256), tl.constexpr(512), tl.constexpr(520), \
    tl.constexpr(528)
READY = tl.constexpr(1 << 30)


@triton.jit
def _select_kernel(s_ptr, st_ptr, budget_ptr, idx_ptr, keep_ptr, S, K, NQ, stride_st, NC: tl.constexpr,
                   NC_P: tl.constexpr, CHUNK: tl.constexpr, K_PER: tl.constexpr, K_PER_P: tl.constexpr):
    row = tl.program_id(1)
    st = st_ptr + row * stride_st
    t = tl.atomic_add(st + TICKET, 1, sem="relaxed")  # this program's role and chunk
    first = t < NC
    c = tl.where(first, t, t - NC)
    j = c * CHUNK + tl.arange(0, CHUNK)  # (CHUNK,) positions
    s = tl.load(s_ptr + row.to(tl.int64) * S + j, mask=j < S, other=float("-inf"))
    key = _desc16(s)
    live = s > float("-inf")  # candidates
    bins = tl.arange(0, 256)
    coarse = tl.load(st + COARSE + bins)
    n = tl.minimum(tl.maximum(tl.load(budget_ptr + row // NQ).to(tl.int32), 0), K)
    n = tl.minimum(n, tl.sum(coarse, 0))  # how many the row selects
    cb = tl.sum((tl.cumsum(coarse, 0) < n).to(tl.int32), 0)  # the coarse bin of the n-th key (0 when n = 0)
    if first:
        h = tl.histogram(key & 255, 256, mask=live & ((key >> 8) == cb))
        tl.atomic_add(st + FINE + bins, h, mask=h > 0, sem="relaxed")
        tl.debug_barrier()  # every thread's adds come before the sign-in, a release by one thread
        tl.atomic_add(st + ARRIVE, 1, sem="release")
    else:
        arrived = tl.atomic_add(st + ARRIVE, 0, sem="acquire")
        while arrived < NC:
            arrived = tl.atomic_add(st + ARRIVE, 0, sem="acquire")
        fine = tl.load(st + FINE + bins, volatile=True)
        need = n - tl.sum(tl.where(bins < cb, coarse, 0), 0)  # keys still to take in coarse bin cb
        fb = tl.sum((tl.cumsum(fine, 0) < need).to(tl.int32), 0)
        need_eq = need - tl.sum(tl.where(bins < fb, fine, 0), 0)
        T = cb * 256 + fb  # the n-th key: all keys below it (better) are taken, and the first need_eq equal to it
        gt, eq = live & (key < T), live & (key == T)
        tl.atomic_xchg(st + WORDS + c, READY | (tl.sum(gt.to(tl.int32), 0) << 15) | tl.sum(eq.to(tl.int32), 0),
                       mask=c < NC, sem="relaxed")  # c >= NC only on a state that was not zeroed: stay in the row
        ch = tl.arange(0, NC_P)
        before = (ch < c) & (ch < NC)  # the chunks before this one
        w = tl.load(st + WORDS + ch, mask=before, other=READY, volatile=True)
        while tl.min(w, 0) < READY:
            w = tl.load(st + WORDS + ch, mask=before, other=READY, volatile=True)
        gt_before, eq_before = tl.sum((w >> 15) & 0x7FFF, 0), tl.sum(w & 0x7FFF, 0)
        sel = gt | (eq & (eq_before + tl.cumsum(eq.to(tl.int32), 0) <= need_eq))
        slot = gt_before + tl.minimum(eq_before, need_eq) + tl.cumsum(sel.to(tl.int32), 0) - 1
        out = row.to(tl.int64) * K
        tl.store(idx_ptr + out + slot, j.to(tl.int64), mask=sel)
        k = c * K_PER + tl.arange(0, K_PER_P)  # this program's share of keep, and of the unselected slots of idx
        ok = (tl.arange(0, K_PER_P) < K_PER) & (k < K)
        tl.store(keep_ptr + out + k, k < n, mask=ok)
        tl.store(idx_ptr + out + k, tl.zeros([K_PER_P], tl.int64), mask=ok & (k >= n))


def state_width(S: int, chunk: int) -> int:
    """Int32 words in a row of the select state: the fixed fields, one look-back word per chunk, rounded up to 16
    (rows 64-byte aligned)."""
    return -(-(WORDS.value + triton.cdiv(S, chunk)) // 16) * 16


def select_state(rows: int, S: int, chunk: int = CHUNK, device=None) -> Tensor:
    """The zeroed int32 state (rows, state_width) that launch_latent_scores adds the coarse bins into and
    launch_select works in."""
    return torch.zeros(rows, state_width(S, chunk), dtype=torch.int32, device=device)


def launch_select(scores: Tensor, state: Tensor, budget: Tensor, idx: Tensor, keep: Tensor, chunk: int = CHUNK,
                  num_warps: int = 4):
    """The selection into idx, keep (B, NQ, k) (tests pass poisoned buffers): scores (B, NQ, S) float32 (-inf: not a
    candidate), state as select_state(B * NQ, S, chunk) holding the coarse bins launch_latent_scores added and zeros
    elsewhere, budget (B,) integer tokens each sequence attends (may be <= 0 or > k)."""
    B, NQ, S = scores.shape
    K = idx.shape[-1]
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        raise ValueError(f"scores must be contiguous float32, got {scores.dtype}.")
    if idx.shape != (B, NQ, K) or keep.shape != idx.shape or not (idx.is_contiguous() and keep.is_contiguous()):
        raise ValueError(f"idx and keep must be contiguous ({B}, {NQ}, k), got {tuple(idx.shape)}, "
                         f"{tuple(keep.shape)}.")
    if budget.shape != (B,) or budget.is_floating_point():
        raise ValueError(f"budget must be a ({B},) integer tensor (each sequence's n_attend), got "
                         f"{tuple(budget.shape)} {budget.dtype}.")
    if chunk & (chunk - 1) or not 16 <= chunk <= 1 << 14:  # the look-back word holds counts below 2^15
        raise ValueError(f"chunk {chunk} must be a power of two in 16..16384.")
    if K > S:
        raise ValueError(f"k = {K} is more than the {S} positions a row has.")
    if state.shape != (B * NQ, state_width(S, chunk)) or state.dtype != torch.int32 or not state.is_contiguous():
        raise ValueError(f"state must be select_state({B * NQ}, {S}, {chunk}), got {tuple(state.shape)} "
                         f"{state.dtype}.")
    if K == 0:
        return
    NC = triton.cdiv(S, chunk)
    K_PER = triton.cdiv(K, NC)
    torch.library.wrap_triton(_select_kernel)[(2 * NC, B * NQ)](
        scores, state, budget, idx, keep, S, K, NQ, state.stride(0), NC=NC, NC_P=triton.next_power_of_2(NC),
        CHUNK=chunk, K_PER=K_PER, K_PER_P=triton.next_power_of_2(K_PER), num_warps=num_warps)


@torch.library.triton_op("sals::select_top", mutates_args=())
def select_top(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, budget: Tensor, n_sink: int, window: int,
               k: int) -> tuple[Tensor, Tensor]:
    """Scores (kernels.latent_score) and selects: k_lat_score (B, S, r*), q_lat (B, NB, NQ, r*), input_pos (B, 1),
    budget (B,) each sequence's tokens to attend. Returns idx, keep (B, NQ, k) as in the module docstring.
    Two launches after one memset, no host sync, static shapes."""
    B, S, _ = k_lat_score.shape
    NB, NQ = query_shape(k_lat_score, q_lat)
    dev = k_lat_score.device
    scores = torch.empty(B, NQ, S, dtype=torch.float32, device=dev)
    state = select_state(B * NQ, S, CHUNK, dev)
    launch_latent_scores(k_lat_score, q_lat, input_pos, n_sink, window, scores, state)
    idx = torch.empty(B, NQ, k, dtype=torch.int64, device=dev)
    keep = torch.empty(B, NQ, k, dtype=torch.bool, device=dev)
    launch_select(scores, state, budget, idx, keep)
    return idx, keep


if __name__ == "__main__":
    import sys

    from kernels.timing import copy_ceiling, graph_us
    CHUNKS = (256, 512, 1024, 2048)
    print("k = S/8 - 80, n_sink 16, window 64, every row at the end, random bf16 latents, NB = 1. 'score+select': "
          "select_top (memset, scoring, selection); 'select': launch_select after a copy of the state (standing for "
          "the memset), per chunk size; floors: bytes at the copy ceiling (select: the scores read, idx and keep "
          "written); exact: idx and keep equal to select_top_reference at every chunk size")
    print(f"| NQ | B | S | r* | score+select us (floor, of floor) | scoring us | select us, chunk "
          f"{'/'.join(map(str, CHUNKS))} (floor, best of floor) | torch.topk us | exact |\n" + "| --- " * 9 + "|")
    for NQ in map(int, sys.argv[1:] or (1, 8)):
        for B in (1, 8, 16):
            for S in (4096, 8192, 16384, 32768, 131072):
                for RS in (64, 256):
                    K = S // 8 - 80
                    lat = torch.randn(B, S, RS, device="cuda", dtype=torch.bfloat16)
                    q = torch.randn(B, 1, NQ, RS, device="cuda", dtype=torch.bfloat16)
                    pos = torch.full((B, 1), S - 1, device="cuda")
                    budget = torch.full((B,), K, dtype=torch.int32, device="cuda")
                    scores = torch.empty(B, NQ, S, device="cuda")
                    hist = select_state(B * NQ, S, CHUNK, "cuda")  # accumulates over the scoring replays: harmless
                    launch_latent_scores(lat, q, pos, 16, 64, scores, hist)
                    ref_idx, ref_keep = select_top_reference(scores, budget, K)
                    idx, keep = select_top(lat, q, pos, budget, 16, 64, K)
                    exact = torch.equal(idx, ref_idx) and torch.equal(keep, ref_keep)
                    t_all = graph_us(lambda: select_top(lat, q, pos, budget, 16, 64, K))
                    t_score = graph_us(lambda: launch_latent_scores(lat, q, pos, 16, 64, scores, hist))
                    t_select = []
                    for chunk in CHUNKS if RS == 64 else ():  # the selection does not depend on r*
                        full = select_state(B * NQ, S, chunk, "cuda")
                        launch_latent_scores(lat, q, pos, 16, 64, scores, full)
                        state = full.clone()

                        def select():
                            state.copy_(full)
                            launch_select(scores, state, budget, idx, keep, chunk)
                        select()
                        exact &= torch.equal(idx, ref_idx) and torch.equal(keep, ref_keep)
                        t_select.append(graph_us(select))
                    t_ref = graph_us(lambda: scores.topk(K, dim=-1))
                    out_bytes = B * NQ * (4 * S + 9 * K)  # scores read (or written), idx and keep written
                    floor_all = (B * (S - 80) * RS * 2 + 2 * out_bytes) / copy_ceiling() * 1e6
                    floor_select = out_bytes / copy_ceiling() * 1e6
                    select_us = (" / ".join(f"{t:.1f}" for t in t_select) +
                                 f" ({floor_select:.1f}, {floor_select / min(t_select):.0%})") if t_select else "-"
                    print(f"| {NQ} | {B} | {S} | {RS} | {t_all:.1f} ({floor_all:.1f}, {floor_all / t_all:.0%}) | "
                          f"{t_score:.1f} | {select_us} | {t_ref:.1f} | {exact} |", flush=True)
                    del lat, scores
