"""A 4-bit model keeps the layout it trains in: after an evaluation pass it still passes gradients, and it computes
exactly what the dequantized NF4 weights compute (bitsandbytes would otherwise repack 4-bit weights for a bf16 CPU
inference kernel on the first eval-mode forward: other logits, and no gradient to the layer's input)."""

import torch

from fts_mcp.models.loading import load_dequantized_nf4, load_model

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def test_training_after_an_evaluation_still_reaches_every_layer(tiny_model):
    model = load_model(str(tiny_model), trust_remote_code=False, quantization="nf4")
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)  # an evaluation step
    model.train()
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=IDS, use_cache=False).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_a_4bit_model_in_eval_mode_computes_what_its_dequantized_weights_compute(tiny_model):
    """What makes a QLoRA adapter answer the same in evaluation, in the runtime and merged."""
    quantized = load_model(str(tiny_model), trust_remote_code=False, quantization="nf4").eval()
    dequantized = load_dequantized_nf4(str(tiny_model), trust_remote_code=False, dtype=torch.float32).eval()
    with torch.no_grad():
        for _ in range(2):  # the first eval-mode forward is where a repack would happen
            assert torch.equal(quantized(input_ids=IDS).logits, dequantized(input_ids=IDS).logits)
