"""Device-resident LoRA slots, applied per row: the heart of heterogeneous batching.

Every adapted linear layer of the base gets a bank of `slots` adapter factor pairs, zero-padded to the bank's
rank (which leaves B @ A unchanged), with each adapter's scaling folded into its B. Slot 0 stays zero: the base
model. Before a forward pass the scheduler says which slot each row of the batch uses (`use`); a forward hook on
each layer adds, for every slot present, `x[rows] @ A[slot].T @ B[slot].T` to those rows' output — the segmented
form of the punica / S-LoRA kernels (SGMV), in plain torch — or, when more than `GATHER_ABOVE` adapters share
the pass, gathers each row's factors and runs two batched matmuls (their BGMV form). A row only ever sees its own
slot's factors.
"""

from __future__ import annotations

from typing import Any

import torch

BASE_SLOT = 0
GATHER_ABOVE = 2  # adapters in one pass beyond which per-row gathering beats one matmul pair per adapter


def adapted_layers(model: Any) -> dict[str, torch.nn.Module]:
    """The linear layers an "all-linear" adapter can target: every Linear (or 4-bit Linear) but the output head,
    by module path (as PEFT names them, without its `base_model.model.` prefix)."""
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if module is not head and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")
            and hasattr(module, "in_features")}


class LoraBank:
    def __init__(self, model: Any, *, slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = adapted_layers(model)
        self.rank, self.slots = rank, slots + 1  # + the base's zero slot
        # kept transposed, (in, rank) and (rank, out), so a pass multiplies without transposing
        self.a = {path: torch.zeros(self.slots, m.in_features, rank, dtype=dtype, device=device)
                  for path, m in self.layers.items()}
        self.b = {path: torch.zeros(self.slots, rank, m.out_features, dtype=dtype, device=device)
                  for path, m in self.layers.items()}
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (slot, rows; None: every row) for this pass
        self.index: torch.Tensor | None = None  # each row's slot, when gathering
        self.handles = [m.register_forward_hook(self._hook(path)) for path, m in self.layers.items()]

    def use(self, slots: list[int], device: torch.device) -> None:
        """Rows' slots for the next forward passes (row i uses slots[i])."""
        present = sorted(set(slots) - {BASE_SLOT})
        self.index = None
        if len(present) > GATHER_ABOVE:
            self.index, self.groups = torch.tensor(slots, device=device), []
        elif len(set(slots)) == 1:
            self.groups = [(present[0], None)] if present else []
        else:
            self.groups = [(s, torch.tensor([i for i, x in enumerate(slots) if x == s], device=device))
                           for s in present]

    def _hook(self, path: str):
        a_bank, b_bank = self.a[path], self.b[path]

        def add_lora(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.index is not None:  # output + (rows, tokens, in) @ (rows, in, rank) @ (rows, rank, out)
                x = inputs[0].to(a_bank.dtype)
                xa = torch.bmm(x, a_bank.index_select(0, self.index))
                if output.dtype == b_bank.dtype:
                    return torch.baddbmm(output, xa, b_bank.index_select(0, self.index))
                return output + torch.bmm(xa, b_bank.index_select(0, self.index)).to(output.dtype)
            if not self.groups:
                return output
            x = inputs[0].to(a_bank.dtype)
            for slot, rows in self.groups:
                a, b = a_bank[slot], b_bank[slot]
                if rows is None:
                    output = output + ((x @ a) @ b).to(output.dtype)
                else:
                    delta = (x.index_select(0, rows) @ a) @ b
                    output = output.index_add(0, rows, delta.to(output.dtype))
            return output

        return add_lora

    @torch.no_grad()
    def load(self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter's factors (A (r, in), B (out, r) with its scaling folded in, r <= rank) into a slot;
        layers it does not adapt are zeroed."""
        for path in self.layers:
            pair = factors.get(path)
            self.a[path][slot].zero_()
            self.b[path][slot].zero_()
            if pair is not None:
                a, b = pair  # (r, in), (out, r)
                self.a[path][slot, :, : a.shape[0]].copy_(a.T, non_blocking=True)
                self.b[path][slot, : b.shape[1]].copy_(b.T, non_blocking=True)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
