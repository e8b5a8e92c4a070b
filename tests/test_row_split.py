"""row_split: one-row CPU linears as a bmm over blocks of outputs equal nn.Linear, whichever layout the weight has;
prepare_for_cpu_decoding (opt-in, never at construction) replaces modules, keeps their parameters and stores the wide
weights column-major with the same values; everything else is nn.Linear itself."""
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config
from torch import nn

from llm_modules import LLMModules
from llm_modules.row_split import WIDE_RATIO, RowSplitLinear, is_wide, prepare_for_cpu_decoding, row_blocks, row_major


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
@pytest.mark.parametrize("frozen", [False, True])
def test_one_row_equals_linear(n_threads, out_features, in_features, bias, frozen, threads):
    threads(n_threads)
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=bias)
    ref = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    lin = prepare_for_cpu_decoding(nn.Sequential(lin))[0] if frozen else RowSplitLinear.from_linear(lin)
    assert isinstance(lin, RowSplitLinear) and isinstance(lin, nn.Linear)
    column = frozen and out_features >= WIDE_RATIO * in_features  # only prepared wide weights change layout
    assert lin.weight.t().is_contiguous() == column and lin.weight.is_contiguous() == (not column)
    assert torch.equal(lin.weight, ref[0])  # same values, whatever the layout
    for shape in [(in_features,), (1, in_features), (1, 1, in_features)]:
        x = torch.randn(shape)
        torch.testing.assert_close(lin(x), F.linear(x, *ref), atol=1e-6, rtol=1e-6)
    if frozen:
        return
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
    assert torch.equal(RowSplitLinear.from_linear(lin)(x), ref)


def test_several_rows_through_a_column_major_weight(threads):
    threads(2)
    torch.manual_seed(0)
    lin = nn.Linear(8, 64)
    w = lin.weight.detach().clone()
    lin = prepare_for_cpu_decoding(nn.Sequential(lin))[0]
    assert lin.weight.t().is_contiguous()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), atol=1e-6, rtol=1e-6)


def test_construction_leaves_stock_modules_and_preparing_replaces_them_keeping_their_parameters():
    model = LLMModules.from_config(tiny_config()).eval()
    stock = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert stock and all(type(m) is nn.Linear for m in stock.values())  # training and FSDP see these
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids).logits
    prepare_for_cpu_decoding(model)
    assert all(type(m) is nn.Linear for m in stock.values())  # the old modules are replaced, not rewritten
    assert all(type(m) is RowSplitLinear for n, m in model.named_modules() if n in stock)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] and not p.requires_grad for n, p in model.named_parameters())  # the same, frozen
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    wide = [m for m in model.modules() if isinstance(m, RowSplitLinear) and is_wide(m)]
    assert wide and all(m.weight.t().is_contiguous() for m in wide)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_row_major_restores_the_layout():
    lin = prepare_for_cpu_decoding(nn.Sequential(nn.Linear(4, 32)))[0]
    w = lin.weight
    values = w.detach().clone()
    assert not w.is_contiguous()
    row_major([w])
    assert lin.weight is w and w.is_contiguous() and torch.equal(w, values)


def test_the_split_path_runs_and_the_model_keeps_its_keys(threads, monkeypatch):
    model = LLMModules.from_config(tiny_config()).eval()
    keys = sorted(model.state_dict())
    linears = [m for m in prepare_for_cpu_decoding(model).modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is RowSplitLinear for m in linears)
    assert sorted(model.state_dict()) == keys == sorted(prepare_for_cpu_decoding(model).state_dict())  # idempotent
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    threads(2)
    x = torch.randn(1, 1, linears[0].in_features)
    linears[0](x)
    assert calls and calls[0][0] == row_blocks(linears[0].out_features, 2) > 1
