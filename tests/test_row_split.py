"""row_split: one-row CPU linears as a bmm over blocks of outputs equal nn.Linear, whichever layout the weight has;
wide weights are stored column-major with the same values; everything else is nn.Linear itself."""
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config
from torch import nn

from llm_modules import LLMModules
from llm_modules.row_split import WIDE_RATIO, RowSplitLinear, row_blocks, row_major, split_rows
from llm_modules.sharded_state import match_layouts


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_row_blocks_divide_evenly():
    assert row_blocks(896, 2) == 2 and row_blocks(151936, 4) == 4
    assert row_blocks(12, 5) == 4 and row_blocks(7, 4) == 1 and row_blocks(9, 1) == 1 and row_blocks(5, 0) == 1


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4])
@pytest.mark.parametrize("out_features,in_features,bias",
                         [(12, 5, True), (96, 32, False), (7, 3, True), (40, 8, True), (150, 10, False)])
def test_one_row_equals_linear(n_threads, out_features, in_features, bias, threads):
    threads(n_threads)
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=bias)
    ref = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    split_rows(lin)
    assert isinstance(lin, RowSplitLinear) and isinstance(lin, nn.Linear)
    wide = out_features >= WIDE_RATIO * in_features
    assert lin.weight.t().is_contiguous() == wide and lin.weight.is_contiguous() == (not wide)
    assert torch.equal(lin.weight, ref[0])  # same values, whatever the layout
    for shape in [(in_features,), (1, in_features), (1, 1, in_features)]:
        x = torch.randn(shape)
        torch.testing.assert_close(lin(x), F.linear(x, *ref), atol=1e-6, rtol=1e-6)
    # Gradients too (a one-row batch can occur in training).
    x = torch.randn(1, 1, in_features, requires_grad=True)
    lin(x).square().sum().backward()
    w = ref[0].clone().requires_grad_()
    F.linear(x.detach().requires_grad_(), w, ref[1]).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad, atol=1e-5, rtol=1e-5)


def test_several_rows_are_plain_linear_bit_for_bit(threads):
    threads(2)
    lin = nn.Linear(8, 12)
    x = torch.randn(2, 3, 8)
    ref = lin(x)
    assert torch.equal(split_rows(lin)(x), ref)


def test_several_rows_through_a_column_major_weight(threads):
    threads(2)
    torch.manual_seed(0)
    lin = nn.Linear(8, 64)
    w = lin.weight.detach().clone()
    split_rows(lin)
    assert lin.weight.t().is_contiguous()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), atol=1e-6, rtol=1e-6)


def test_row_major_and_optimizer_state_follow_the_parameter():
    lin = split_rows(nn.Linear(4, 32))
    w = lin.weight
    opt = torch.optim.AdamW(lin.parameters())
    opt.state[w] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(32, 4), "exp_avg_sq": torch.rand(32, 4)}
    saved = {k: v.clone() for k, v in opt.state[w].items()}
    match_layouts(opt)  # a loaded checkpoint holds contiguous tensors: give them the parameter's strides
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[w][k].stride() == w.stride() and torch.equal(opt.state[w][k], saved[k])
    values = w.detach().clone()
    row_major([w])
    assert lin.weight is w and w.is_contiguous() and torch.equal(w, values)


def test_the_split_path_runs_and_the_model_keeps_its_keys(threads, monkeypatch):
    model = LLMModules.from_config(tiny_config()).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is RowSplitLinear for m in linears)
    assert sorted(model.state_dict()) == sorted(split_rows(model).state_dict())  # idempotent, same keys
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    threads(2)
    x = torch.randn(1, 1, linears[0].in_features)
    linears[0](x)
    assert calls and calls[0][0] == row_blocks(linears[0].out_features, 2) > 1
