"""lm-evaluation-harness integration on tiny-random: an end-to-end run of the local tasks in
tests/fixtures/harness/ (multiple choice, generation, perplexity), checked against direct computations."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local json tasks must never reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llm_modules import LLMModules, LLMModulesConfig, UserError  # noqa: E402
from llm_modules.backbones import load_hf_config  # noqa: E402
from llm_modules.harness import LLMModulesLM, evaluate_harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "harness"
L = 64  # context window for the run: the long perplexity document needs several windows
TOL = 1e-4


def enc(text: str) -> list[int]:
    return list(text.encode())  # the byte-level tokenizer: token id == byte value


@torch.no_grad()
def logprobs(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return torch.log_softmax(out.logits[0].float(), -1)


def direct_ll(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded forward: log_softmax gathered at the continuation, and whether argmax matches it."""
    seq = (ctx + cont)[-(L + 1):]
    lp, target = logprobs(model, seq[:-1])[-len(cont):], torch.tensor(cont)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def direct_rolling(model, text: str, prefix: int) -> float:
    """Each token predicted once, from a window of the L tokens before it (the first one from `prefix`)."""
    toks = enc(text)
    seq, total = [prefix] + toks, 0.0
    for start in range(0, len(toks), L):
        end = min(start + L, len(toks))
        lp = logprobs(model, seq[max(0, end - L):end])[-(end - start):]
        total += float(lp.gather(1, torch.tensor(toks[start:end])[:, None]).sum())
    return total


def request(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Ops this small gain nothing from a second thread, and on a busy machine its spin-waits cost several times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-random")
    LLMModules.from_config(LLMModulesConfig.from_yaml(ROOT / "configs" / "tiny-random.yaml")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(checkpoint):
    return LLMModules.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def lm(checkpoint):
    return LLMModulesLM(checkpoint=str(checkpoint), batch_size=3, max_length=L, device="cpu")


@pytest.fixture(scope="module")
def run(checkpoint):
    """One harness run over the three local tasks, with per-sample outputs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
        return evaluate_harness(checkpoint, "llm_modules_local", batch_size=4, model_args={"max_length": L},
                                task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
                                log_samples=True, bootstrap_iters=0)


def test_run_reports_all_tasks(run):
    res = run["results"]
    assert set(res) == {"llm_modules_mc", "llm_modules_gen", "llm_modules_ppl"}
    assert 0.0 <= res["llm_modules_mc"]["acc,none"] <= 1.0
    assert res["llm_modules_ppl"]["byte_perplexity,none"] > 1.0
    assert [len(run["samples"][t]) for t in ("llm_modules_mc", "llm_modules_gen", "llm_modules_ppl")] == [4, 3, 2]


def test_loglikelihood_matches_direct_forward(run, model):
    n = 0
    for sample in run["samples"]["llm_modules_mc"]:
        for (ctx, cont), resp in zip(sample["arguments"], sample["resps"]):
            ll, greedy = resp[0]
            want_ll, want_greedy = direct_ll(model, enc(ctx), enc(cont))
            assert abs(ll - want_ll) < TOL, (ctx, cont)
            assert greedy == want_greedy
            n += 1
    assert n == 13  # every choice of every item, scored in padded, length-sorted batches


def test_loglikelihood_rolling_matches_direct_sum(run, model):
    docs = run["samples"]["llm_modules_ppl"]
    assert len(enc(docs[1]["doc"]["text"])) > 2 * L  # the long document really is windowed
    for sample in docs:
        text = sample["doc"]["text"]
        assert abs(sample["resps"][0][0] - direct_rolling(model, text, model.tokenizer.eos_token_id)) < TOL
    short = docs[0]["doc"]["text"]  # within one window it is the plain sum over the document
    full = logprobs(model, [model.tokenizer.eos_token_id] + enc(short)[:-1])
    assert abs(docs[0]["resps"][0][0] - float(full.gather(1, torch.tensor(enc(short))[:, None]).sum())) < TOL


def test_generate_until_matches_direct_greedy_cut_at_until(run, model):
    tok = model.tokenizer
    for sample in run["samples"]["llm_modules_gen"]:
        ctx, kwargs = sample["arguments"][0]
        new = model.generate(torch.tensor([enc(ctx)]), max_new_tokens=kwargs["max_gen_toks"])
        want = tok.decode(new[0].tolist(), skip_special_tokens=True)
        for stop in kwargs["until"]:
            want = want.split(stop)[0]
        got = sample["resps"][0][0]
        assert got == want and not any(s in got for s in kwargs["until"])


def test_greedy_flag_true_exactly_for_the_greedy_continuation(lm, model):
    ctx = enc("Question: Two plus two is\nAnswer:")
    greedy = model.generate(torch.tensor([ctx]), max_new_tokens=4)[0].tolist()
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 256]
    reqs = [(None, ctx, greedy), (None, ctx, wrong), (None, ctx[:7], enc(" four"))]
    out = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in out][:2] == [True, False]
    for (_, c, t), (ll, g) in zip(reqs, out):
        assert abs(ll - direct_ll(model, c, t)[0]) < TOL and g == direct_ll(model, c, t)[1]


def test_generate_until_stops_at_a_string_the_model_produces(lm):
    gen = lambda ctx, until: request("generate_until", ctx, {"until": until, "max_gen_toks": 6})  # noqa: E731
    # Batched with a longer prompt, the short one is left-padded: it must give what it gives alone.
    free, _ = lm.generate_until([gen("Q: hi\nA:", []), gen("Q: a much longer question?\nA:", [])], disable_tqdm=True)
    assert lm.generate_until([gen("Q: hi\nA:", [])], disable_tqdm=True) == [free]
    stop = next(ch for ch in free[1:] if ch != "\ufffd")  # a character the model does produce
    cut = lm.generate_until([gen("Q: hi\nA:", [stop])], disable_tqdm=True)[0]
    assert cut == free[: free.index(stop)]


def test_context_trailing_space_moves_to_the_continuation(lm, model):
    (ll, _), = lm.loglikelihood([request("loglikelihood", "A cat says ", "meow")], disable_tqdm=True)
    assert abs(ll - direct_ll(model, enc("A cat says"), enc(" meow"))[0]) < TOL


def test_small_alone_baseline_and_large_only(tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM

    tiny = LLMModulesConfig.from_yaml(ROOT / "configs" / "tiny-random.yaml")
    LLMModules.from_config(tiny.replace(coupling="none")).save_pretrained(tmp_path / "alone")
    # A large model saved as a Hugging Face directory, loaded by name the way real ones are.
    hf = AutoModelForCausalLM.from_config(load_hf_config(tiny.large, "large"))
    hf.save_pretrained(tmp_path / "hf-large")
    named = tiny.replace(large={"name_or_path": str(tmp_path / "hf-large"), "config": None})
    LLMModules.from_config(named).save_pretrained(tmp_path / "named")
    cases = [(LLMModulesLM(checkpoint=str(tmp_path / "alone"), max_length=L), None),
             (LLMModulesLM(checkpoint=str(checkpoint), large_only=True, max_length=L), None),
             (LLMModulesLM(checkpoint=str(tmp_path / "named"), large_only=True, max_length=L), hf.eval())]
    for lm, reference in cases:
        (ll, greedy), = lm.loglikelihood([request("loglikelihood", "Two plus two is", " four")], disable_tqdm=True)
        want_ll, want_greedy = direct_ll(reference or lm.model, enc("Two plus two is"), enc(" four"))
        assert abs(ll - want_ll) < TOL and greedy == want_greedy
        text = lm.generate_until([request("generate_until", "Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 4})],
                                 disable_tqdm=True)[0]
        assert isinstance(text, str) and "\n" not in text
    assert lm.model.get_output_embeddings() is not None  # the large model's own LM head


def test_bad_model_args_are_user_errors(checkpoint):
    with pytest.raises(UserError, match="checkpoint"):
        LLMModulesLM()
    with pytest.raises(UserError, match="batch_size"):
        LLMModulesLM(checkpoint=str(checkpoint), batch_size="auto")
    with pytest.raises(UserError, match="large_onyl"):
        LLMModulesLM(checkpoint=str(checkpoint), large_onyl=True)


def test_eval_cli_harness_shortcut(tmp_path, capsys, monkeypatch):
    from llm_modules.__main__ import main

    monkeypatch.chdir(ROOT)
    d = tmp_path / "ck"
    LLMModules.from_config(LLMModulesConfig.from_yaml("configs/tiny-random.yaml")).save_pretrained(d)
    assert main(["eval", "--checkpoint", str(d), "--harness-tasks", "llm_modules_mc", "--include-path",
                 "tests/fixtures/harness"]) == 0
    assert "llm_modules_mc" in capsys.readouterr().out
