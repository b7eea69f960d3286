"""A model that calls flashgen, trained under ``torch.compile``.

The attention layer builds its ``fg.Attention`` once, in ``__init__``, from a mod that reads a
learnable relative-position table. Inside the compiled step the call is one custom operator
(``flashgen::attention``, with its backward), so ``fullgraph=True`` holds and the step runs the same
kernels as eager code. The script checks the compiled step's gradients against the eager step's.

Run: ``PYTHONPATH=. python3 examples/compiled_training.py``
"""

import sys

import torch

import flashgen as fg


class RelativeAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.table = torch.nn.Parameter(torch.zeros(heads, 2 * max_len - 1))  # [heads, q_idx - kv_idx]
        self.attn = fg.compile(score_mod=fg.mods.relative_bias(self.table), mask_mod=fg.mods.causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, dim = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.attn(q, k, v).transpose(1, 2).reshape(B, S, dim)


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, S, dim, heads), tol = "cuda", torch.bfloat16, (4, 1024, 512, 8), 2e-2
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, S, dim, heads), tol = "cpu", torch.float32, (2, 64, 64, 2), 1e-4
    torch.manual_seed(0)
    model = RelativeAttention(dim, heads, S).to(device=device, dtype=dtype)
    with torch.no_grad():
        model.table.normal_(0.0, 0.5)
    x = torch.randn(B, S, dim, device=device, dtype=dtype)

    def step(x):
        return model(x).float().square().mean()

    explained = torch._dynamo.explain(step)(x)
    print(f"compiled step: {explained.graph_count} graph, {explained.graph_break_count} graph breaks")
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        fn(x).backward()
        grads.append({name: p.grad.double() for name, p in model.named_parameters()})
    worst = max(((grads[1][n] - g).norm() / g.norm()).item() for n, g in grads[0].items())
    print(f"compiled against eager gradients: largest relative difference {worst:.2e} "
          f"(tolerance {tol:.0e}, {device}, {str(dtype).removeprefix('torch.')})")
    return 0 if worst <= tol and explained.graph_break_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
