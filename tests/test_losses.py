"""The chunked cross-entropy (llm_modules/losses.py) gives the full one's loss and gradients."""
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from llm_modules import LLMModules, LLMModulesConfig, UserError
from llm_modules.losses import chunked_cross_entropy


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_loss_and_gradients_equal_the_full_cross_entropy(reduction, chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 301, bias=True)
    hidden = torch.randn(2, 19, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 301, (2, 19), generator=g)
    targets[0, :5] = -100  # positions where no label is taken
    targets[1, 11] = -100
    grads = []
    for loss_fn in (lambda: F.cross_entropy(head(hidden).flatten(0, 1).float(), targets.flatten(),
                                            reduction=reduction),
                    lambda: chunked_cross_entropy(hidden, targets, head, chunk_size=chunk, reduction=reduction)):
        head.zero_grad()
        hidden.grad = None
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    for full, chunked in zip(*grads):
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_no_grad_and_all_ignored():
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(10, 8)
    targets = torch.full((10,), -100)
    with torch.no_grad():
        assert chunked_cross_entropy(hidden, targets, head, chunk_size=3).item() == 0.0
        targets[3] = 7
        full = F.cross_entropy(head(hidden), targets, reduction="sum")
        torch.testing.assert_close(chunked_cross_entropy(hidden, targets, head, chunk_size=3), full)


def test_model_training_loss_chunked_equals_full():
    """LLMModules.forward(return_logits=False, chunked_loss=True): the same loss and trainable gradients."""
    model = LLMModules.from_config(tiny_config()).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    results = []
    for chunked in (False, True):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        out = model(ids, mask, labels, return_logits=False, chunked_loss=chunked)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), out.num_targets,
                        {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}))
        assert (out.target_logits is None) == chunked
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and grads_a.keys() == grads_b.keys() and grads_a
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_loss_with_distillation_is_a_config_error():
    base = tiny_config().to_dict()
    LLMModulesConfig.from_dict({**base, "train": {**base["train"], "chunked_loss": True}})
    with pytest.raises(UserError, match="chunked_loss"):
        LLMModulesConfig.from_dict({**base, "train": {**base["train"], "chunked_loss": True, "distill_weight": 0.5}})


def test_training_cli_with_chunked_loss_matches_the_full_loss(tmp_path):
    """Two steps through the CLI: the same logged losses with train.chunked_loss on and off."""
    import json

    from llm_modules.__main__ import main

    losses = []
    for chunked in ("false", "true"):
        out = tmp_path / chunked
        assert main(["train", "--config", "configs/tiny-random.yaml", "--output-dir", str(out), "--max-steps", "2",
                     "--train.eval_every", "2", "--save-every", "2", "--train.chunked_loss", chunked]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([r.get("train_loss", r.get("val_loss")) for r in rows])
    assert len(losses[0]) == 3
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-5)
