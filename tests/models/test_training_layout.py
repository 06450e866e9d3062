"""A 4-bit model loaded for training keeps passing gradients after an evaluation pass (bitsandbytes repacks 4-bit
weights for CPU inference on the first eval-mode forward, and a repacked layer passes no gradient to its input)."""

import torch

from fts_mcp.models.loading import load_model


def input_gradient_after_an_eval_pass(tiny_model, training: bool) -> torch.Tensor:
    model = load_model(str(tiny_model), trust_remote_code=False, quantization="nf4", training=training)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # an evaluation step
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
    return embeds.grad


def test_training_after_an_evaluation_still_reaches_every_layer(tiny_model):
    grad = input_gradient_after_an_eval_pass(tiny_model, training=True)
    assert grad is not None and grad.abs().sum() > 0
    layers = load_model(str(tiny_model), trust_remote_code=False, quantization="nf4", training=True).modules()
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
