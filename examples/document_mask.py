"""Packed sequences: a hand-written document mask, combined with causal.

Several documents are packed into one sequence of length S; ``doc_ids[b, i]`` is the document of
position ``i`` in batch entry ``b``. A query may only see earlier keys of its own document.

``doc_ids`` is read by the mod, so flashgen captures it as a kernel input: new document
boundaries written into the same tensor (each training step's packed batch) are picked up by the
next call without retracing or recompiling. The kernels' block maps (which tiles are empty, full
or partial) are then rebuilt on the GPU by two generated kernels, without a copy to the host.

Run: ``PYTHONPATH=. python3 examples/document_mask.py``
"""

import sys

import torch

import flashgen as fg


def random_documents(batch: int, seq_len: int, num_docs: int, device: str) -> torch.Tensor:
    """``[batch, seq_len]`` int32 document ids, 0..num_docs-1, with random boundaries per row."""
    cuts = torch.stack([torch.randperm(seq_len - 1)[: num_docs - 1] + 1 for _ in range(batch)])
    positions = torch.arange(seq_len)
    ids = (positions[None, :, None] >= cuts[:, None, :]).sum(-1)
    return ids.to(device=device, dtype=torch.int32)


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 2e-2
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 128, 64), 1e-4
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    doc_ids = random_documents(B, S, num_docs=4, device=device)

    @fg.mask_mod
    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx] == doc_ids[b, kv_idx]

    # decorated masks combine with & | ~; the causal part becomes a band, the document test
    # stays as a residual mask evaluated on the visited blocks
    mask = same_document & fg.mods.causal
    attn = fg.compile(mask_mod=mask)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    grad_tol = 3e-2 if dtype == torch.bfloat16 else tol  # (gradients in bf16: rounded twice more)
    worst = worst_grad = 0.0
    for step, num_docs in enumerate((4, 9, 2)):  # a training loop: a new packed batch every step
        if step:  # new boundaries, written in place: the compiled kernels read them as an input
            doc_ids.copy_(random_documents(B, S, num_docs=num_docs, device=device))
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves)
        dout = torch.randn_like(out)
        out.backward(dout)
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = fg.attention_reference(*exact, mask_mod=mask)
        ref.backward(dout.double())
        worst = max(worst, rel(out, ref))
        worst_grad = max(worst_grad, *(rel(a.grad, b.grad) for a, b in zip(leaves, exact)))

    print(f"document & causal, 3 steps with new document ids: worst relative error {worst:.2e} (tolerance "
          f"{tol:.0e}), of dq, dk, dv {worst_grad:.2e} (tolerance {grad_tol:.0e}); {device}, "
          f"{str(dtype).removeprefix('torch.')}")
    return 0 if worst <= tol and worst_grad <= grad_tol else 1


if __name__ == "__main__":
    sys.exit(main())
