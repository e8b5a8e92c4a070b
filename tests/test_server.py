"""The OpenAI-compatible server (`llm-modules serve`): the real uvicorn server on a free port, a tiny-random
checkpoint, and the official `openai` client."""
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from llm_modules import LLMModules, LLMModulesConfig  # noqa: E402
from llm_modules.__main__ import main  # noqa: E402
from llm_modules.generate import IncrementalDecoder, prompt_batch  # noqa: E402
from llm_modules.prompts import encode_segments  # noqa: E402
from llm_modules.server import bind, create_app, load_engine, uvicorn_server  # noqa: E402

TINY = "configs/tiny-random.yaml"


class Running:
    """The real uvicorn server in a background thread, on a free port."""

    def __init__(self, engine, name="tiny", api_key=None):
        self.engine, self.name, self.api_key = engine, name, api_key
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(create_app(engine, name, api_key), log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, api_key=None, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "none", max_retries=0,
                             timeout=60, **kw)

    def post(self, path, data, headers=None):
        """(status, decoded JSON) of a raw POST (bytes or a JSON-able object)."""
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=raw, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


def _save(tmp_path_factory, name, cfg):
    d = tmp_path_factory.mktemp(name)
    LLMModules.from_config(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory, "tiny", LLMModulesConfig.from_yaml(TINY))


@pytest.fixture(scope="module")
def srv(ckpt):
    running = Running(load_engine(ckpt, max_batch_size=8))
    yield running
    running.stop()


USER = [{"role": "user", "content": "What is 2 + 3?"}]


def reference_text(model, messages, max_new_tokens):
    """What `llm-modules generate` answers (greedy): the model's own prompt_batch + generate, decoded."""
    tok = model.tokenizer
    ids, mask, extra = prompt_batch(model, [messages])
    new = model.generate(ids, mask, max_new_tokens=max_new_tokens, model_kwargs=extra)[0].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True), len(ids[0])


def test_tiny_tokenizer_has_pad_and_eos_and_decodes_incrementally(srv):
    tok = srv.engine.tokenizer
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    dec = IncrementalDecoder(tok)
    ids = tok.encode("done: 数学 ✓", add_special_tokens=False)
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == "done: 数学 ✓"


def test_models_lists_the_checkpoint(srv):
    assert [m.id for m in srv.client().models.list().data] == ["tiny"]
    assert srv.client().models.retrieve("tiny").id == "tiny"


def test_chat_streamed_and_not_equal_generate(srv):
    client = srv.client()
    want, n_prompt = reference_text(srv.engine.model, USER, 12)
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.choices[0].finish_reason in ("stop", "length") and out.object == "chat.completion"
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    assert out.usage.completion_tokens <= 12 and (out.choices[0].finish_reason == "length") == (
        out.usage.completion_tokens == 12)

    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert all(c.choices[0].delta.content for c in chunks[1:-2])  # one chunk per (non-empty) text delta


def test_completions_take_raw_text(srv):
    model, client = srv.engine.model, srv.client()
    ids = encode_segments([("Once upon a time", False)], model.config.data.format, model.tokenizer)[0]
    new = model.generate(torch.tensor([ids]), max_new_tokens=7)[0].tolist()
    new = new[: new.index(model.tokenizer.eos_token_id)] if model.tokenizer.eos_token_id in new else new
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0)
    assert out.choices[0].text == model.tokenizer.decode(new, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_sampling_seed_and_stop(srv):
    client = srv.client()
    kw = dict(model="tiny", messages=USER, max_tokens=16, temperature=1.2, top_p=0.9)
    a = client.chat.completions.create(seed=3, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=3, **kw).choices[0].message.content == a
    free = client.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0).choices[0].text
    stop = free[3:5]
    if stop and stop not in free[:3]:  # cut at the first occurrence, the stop string itself left out
        cut = client.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0, stop=stop,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_eight_concurrent_clients_are_batched_and_greedy_outputs_equal_sequential(srv):
    client = srv.client()
    jobs = [([{"role": "user", "content": f"question {i}: " + "x" * (3 * i)}], 6 + 2 * i) for i in range(8)]

    def ask(job):
        messages, n = job
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=n,
                                              temperature=0).choices[0].message.content

    sequential = [ask(j) for j in jobs]
    before = len(srv.engine.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        with srv.engine.held():  # all eight queue up, then decode as one batch
            futures = [pool.submit(ask, j) for j in jobs]
            deadline = time.monotonic() + 20
            while srv.engine.pending < 8:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        together = [f.result() for f in futures]
    assert together == sequential
    assert srv.engine.batch_sizes[before:] == [8]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(srv, monkeypatch):
    engine = srv.engine
    monkeypatch.setattr(engine, "eos", set())  # no early end of sequence: only the disconnect can stop the long row
    jobs = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda job: jobs.append(job) or real_submit(job))
    client = srv.client()
    short = [{"role": "user", "content": "short one"}]
    alone = client.chat.completions.create(model="tiny", messages=short, max_tokens=20, temperature=0)
    with ThreadPoolExecutor(1) as pool:
        with engine.held():  # the long stream and a short request share one batch
            stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=900, temperature=0,
                                                    stream=True)
            other = pool.submit(client.chat.completions.create, model="tiny", messages=short, max_tokens=20,
                                temperature=0)
            while engine.pending < 2:
                time.sleep(0.01)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the client goes away
        assert other.result().choices[0].message.content == alone.choices[0].message.content
    deadline = time.monotonic() + 10
    while engine.running:
        assert time.monotonic() < deadline, "the batch kept running for a client that left"
        time.sleep(0.01)
    long_job = jobs[1]
    assert long_job.cancelled and long_job.produced < 900
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
    assert out.usage.completion_tokens == 5  # later requests are served as before


BAD_CHAT = [
    # (what, body, status, param, a piece of the message)
    ("malformed JSON", b'{"messages": [', 400, None, "malformed JSON"),
    ("not an object", b"[1, 2]", 400, None, "JSON object"),
    ("missing messages", {"model": "tiny"}, 400, "messages", "required"),
    ("messages not a list", {"messages": "hi"}, 400, "messages", "array"),
    ("max_tokens a string", {"messages": USER, "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ("temperature a string", {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("stream a string", {"messages": USER, "stream": "yes"}, 400, "stream", "boolean"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "'user'"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("empty content", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content", "empty"),
    ("no messages", {"messages": []}, 400, "messages", "at least one"),
    ("ends with the assistant", {"messages": USER + [{"role": "assistant", "content": "5"}]}, 400,
     "messages[1].role", "end with a user message"),
    ("max_tokens beyond the context", {"messages": USER, "max_tokens": 5000}, 400, "max_tokens", "context of 1024"),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "x" * 1100}]}, 400, "messages",
     "context is 1024"),
    ("max_tokens 0", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("top_p 0", {"messages": USER, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("temperature 3", {"messages": USER, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("n 2", {"messages": USER, "n": 2}, 400, "n", "n=1"),
    ("five stop strings", {"messages": USER, "stop": list("abcde")}, 400, "stop", "at most 4"),
    ("stop a number", {"messages": USER, "stop": 5}, 400, "stop", "string or a list of strings"),
    ("message not an object", {"messages": [5]}, 400, "messages[0]", "object"),
    ("message without a role", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "required"),
    ("unknown model", {"model": "gpt-4", "messages": USER}, 404, "model", "'gpt-4' does not exist"),
]


@pytest.mark.parametrize("what,body,status,param,message", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests_get_openai_errors_naming_the_field(srv, what, body, status, param, message):
    got, out = srv.post("/v1/chat/completions", body)
    assert got == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert message in err["message"] and (param is None or err["message"].startswith(param))


BAD_COMPLETION = [
    ("missing prompt", {"max_tokens": 3}, "prompt", "required"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("several prompts", {"prompt": ["a", "b"]}, "prompt", "one string"),
    ("prompt a number", {"prompt": 5}, "prompt", "must be a string"),
    ("echo", {"prompt": "a", "echo": True}, "echo", "not supported"),
]


@pytest.mark.parametrize("what,body,param,message", BAD_COMPLETION, ids=[c[0] for c in BAD_COMPLETION])
def test_bad_completion_requests(srv, what, body, param, message):
    got, out = srv.post("/v1/completions", body)
    assert got == 400 and out["error"]["param"] == param and message in out["error"]["message"]


def test_the_openai_client_sees_the_errors_and_the_server_keeps_serving(srv):
    client = srv.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5000)
    assert e.value.status_code == 400 and "max_tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER)
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0).choices


def test_api_key(ckpt):
    running = Running(load_engine(ckpt), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        status, out = running.post("/v1/chat/completions", {"messages": USER, "max_tokens": 2})
        assert status == 401 and "missing API key" in out["error"]["message"]
        status, out = running.post("/v1/chat/completions", b"{not json", {"Authorization": "Bearer nope"})
        assert status == 401 and out["error"]["code"] == "invalid_api_key"  # the key is checked first
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        ok = running.client().chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0)
        assert ok.usage.completion_tokens >= 1
    finally:
        running.stop()


@pytest.mark.parametrize("variant", ["prompt", "none", "large-only"])
def test_other_couplings_and_the_large_model_alone(tmp_path_factory, ckpt, variant):
    if variant == "prompt":
        d = _save(tmp_path_factory, "prompt", LLMModulesConfig.from_yaml("configs/tiny-prompt.yaml"))
    elif variant == "none":
        d = _save(tmp_path_factory, "none", LLMModulesConfig.from_yaml(TINY).replace(coupling="none"))
    else:
        d = ckpt
    engine = load_engine(d, large_only=variant == "large-only")
    running = Running(engine, name="m")
    try:
        client = running.client()
        out = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0)
        streamed = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
        if variant == "large-only":
            from llm_modules.loading import load_for_eval

            lm, tok, _, limit = load_for_eval(d, large_only=True)
            assert engine.context == limit == 4096
            ids = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])
            new = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
            new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            want, n_prompt = tok.decode(new, skip_special_tokens=True), ids.shape[1]
        else:
            want, n_prompt = reference_text(engine.model, USER, 8)
        assert out.choices[0].message.content == want and out.usage.prompt_tokens == n_prompt
        # two rows of different lengths in one batch give what each gives alone
        other = [{"role": "user", "content": "a longer question than the first one"}]
        alone = client.chat.completions.create(model="m", messages=other, max_tokens=8, temperature=0)
        with ThreadPoolExecutor(2) as pool, engine.held():
            fs = [pool.submit(client.chat.completions.create, model="m", messages=m, max_tokens=8, temperature=0)
                  for m in (USER, other)]
            while engine.pending < 2:
                time.sleep(0.01)
        assert [f.result().choices[0].message.content for f in fs] == [want, alone.choices[0].message.content]
        assert engine.batch_sizes[-1] == 2
    finally:
        running.stop()


def test_serve_command_errors(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
