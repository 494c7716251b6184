"""Generation API: stop strings, EOS, cancellation, beam search against a naive reference, decoder
forks, text streaming, sessions saved and restored. Also holds the tiny tokenizer / model-folder
helpers the other inference tests import."""


import pytest
import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import (GenerationConfig, TextStream, generate, make_decoder, select_rows,
                                        state_nbytes)
from tiny import random_ids, tiny_hmt, tiny_tokenizer

def test_stop_string_cuts_the_text_and_ends_generation():
    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompt = random_ids(1, 20)
    free = generate(model, prompt, GenerationConfig(max_new_tokens=40), decode=decode)
    stop = free.text[0][10:12]
    cut = free.text[0].index(stop)
    out = generate(model, prompt, GenerationConfig(max_new_tokens=40, stop_strings=[stop]), decode=decode)
    assert out.finish_reason == "stop"
    assert out.text[0] == free.text[0][:cut]
    assert out.tokens.shape[1] < 40 and torch.equal(out.tokens[0], free.tokens[0, :out.tokens.shape[1]])


def test_eos_ends_a_row_and_min_new_tokens_holds_it_back():
    model = tiny_hmt("llama")
    prompt = random_ids(2, 10)
    free = generate(model, prompt, GenerationConfig(max_new_tokens=30))
    eos = int(free.tokens[0, 4])  # a token row 0 produces: it becomes the EOS id
    out = generate(model, prompt, GenerationConfig(max_new_tokens=30, eos_token_id=eos))
    for row in range(2):
        hits = (free.tokens[row] == eos).nonzero()
        if len(hits):  # the row ends at its first EOS, identical up to it, then idles on EOS
            end = int(hits[0]) + 1
            assert out.finish_reasons[row] == "eos"
            assert torch.equal(out.tokens[row, :end], free.tokens[row, :end])
            assert (out.tokens[row, end:] == eos).all()
        else:
            assert out.finish_reasons[row] == "length" and torch.equal(out.tokens[row], free.tokens[row])
    assert out.tokens.shape[1] == (30 if out.finish_reasons[1] == "length" else
                                   max(int((free.tokens[r] == eos).nonzero()[0]) + 1 for r in range(2)))
    late = generate(model, prompt[:1], GenerationConfig(max_new_tokens=30, min_new_tokens=20, eos_token_id=eos))
    assert (late.tokens[0, :20] != eos).all() and late.tokens.shape[1] > 20


def test_should_stop_cancels_cleanly():
    model = tiny_hmt("llama")
    calls = []
    out = generate(model, random_ids(1, 9), GenerationConfig(max_new_tokens=50),
                   should_stop=lambda: calls.append(1) or len(calls) >= 7)
    assert out.finish_reason == "cancelled" and out.tokens.shape == (1, 7)
    assert out.decoder.tokens_seen == 9 + 7  # every produced token was read into memory


def _naive_beam(model, prompt, cfg):
    """Reference beam search: every hypothesis re-read by a fresh decoder (prompt, then one token
    at a time, as the cached search does), no state sharing."""
    def logp_of(seq):
        dec = make_decoder(model)
        logits = dec.feed(prompt)
        for t in seq:
            logits = dec.feed(torch.tensor([[t]]))
        return logits[0].float().log_softmax(-1)

    beams, finished = [(0.0, [])], []
    for step in range(cfg.max_new_tokens):
        cands = sorted(((s + float(lp), seq + [t]) for s, seq in beams
                        for t, lp in enumerate(logp_of(seq).tolist())), key=lambda c: -c[0])
        beams = []
        for s, seq in cands[:2 * cfg.num_beams]:
            if seq[-1] in cfg.eos_ids:
                finished.append((s / len(seq) ** cfg.length_penalty, seq))
            elif len(beams) < cfg.num_beams:
                beams.append((s, seq))
        finished = sorted(finished, key=lambda h: -h[0])[:cfg.num_beams]
        if len(finished) == cfg.num_beams and beams[0][0] / (step + 1) ** cfg.length_penalty <= finished[-1][0]:
            break
    live = [(s / len(seq) ** cfg.length_penalty, seq) for s, seq in beams]
    return max(finished + live, key=lambda h: h[0])[1]


@pytest.mark.parametrize("eos", [None, 7])
def test_beam_search_matches_naive_reference(eos):
    model = tiny_hmt("llama", dtype=torch.float64, stage=1, cache_size=3)
    prompt = random_ids(1, 12)
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=eos, length_penalty=1.0)
    out = generate(model, prompt, cfg)  # 12 + 6 tokens: crosses a segment fold (L = 16)
    assert out.tokens[0].tolist() == _naive_beam(model, prompt, cfg)
    ref = make_decoder(model)
    ref.feed(torch.cat([prompt, out.tokens], 1))
    torch.testing.assert_close(out.decoder.state.bank.embeddings, ref.state.bank.embeddings)
    assert out.decoder.tokens_seen == 12 + out.tokens.shape[1]


def test_beam_search_rejects_sampling_and_batches():
    with pytest.raises(ConfigError):
        GenerationConfig(num_beams=2, do_sample=True)
    with pytest.raises(ConfigError):
        generate(tiny_hmt("llama"), random_ids(2, 5), GenerationConfig(num_beams=2))


def test_select_rows_forks_without_touching_the_original():
    model = tiny_hmt("llama", dtype=torch.float64)
    dec = make_decoder(model)
    dec.feed(random_ids(1, 21))  # one fold + a partial segment with a KV cache
    fork = select_rows(dec, torch.tensor([0, 0]))
    nxt = random_ids(1, 3, seed=5)
    two = fork.feed(nxt.expand(2, -1))
    one = dec.feed(nxt)
    torch.testing.assert_close(two, one.expand(2, -1))
    assert fork.state.batch_size == 2 and dec.state.batch_size == 1
    assert state_nbytes(fork) > state_nbytes(dec) > 0


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    pieces = list("Hi é!".encode()) + list(b" ##EN") + list(b"D tail")  # byte-level "tokens"
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode, ["##END"])
    shown = [stream.push(i) for i in pieces]
    assert all("\ufffd" not in p and "#" not in p for p in shown)
    assert "".join(shown) + stream.finish() == "Hi é! " and stream.text == "Hi é! " and stream.stopped
    plain = TextStream(decode)
    assert "".join(plain.push(i) for i in "né".encode()) + plain.finish() == "né"


def test_stop_matching_agrees_with_a_plain_search():
    import random

    rng = random.Random(0)
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    for _ in range(2000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stream = TextStream(decode, stops)
        shown = "".join(stream.push(b) for b in text.encode()) + stream.finish()
        cut = None  # the first prefix of the text that holds a stop string, cut where the earliest begins
        for end in range(1, len(text) + 1):
            hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                break
        assert shown == stream.text == text[:cut] and stream.stopped == (cut is not None), (stops, text)


def test_stop_matching_is_linear_in_the_text():
    """Long stop strings cost a scan of each character once, not every prefix on every token."""
    import time

    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode, [c * 4096 for c in "wxyz"] + ["a" * 3000 + "b"])
    start = time.perf_counter()
    shown = "".join(stream.push(ord("a")) for _ in range(3000))
    assert time.perf_counter() - start < 0.5  # the quadratic scan took seconds here
    assert shown == "" and stream.finish() == "a" * 3000  # all of it could still become the last stop string


def test_session_roundtrip_continues_identically(tmp_path):
    from hiermem.inference.runtime import ChatFormat
    from hiermem.inference.sessions import Session

    model, tok = tiny_hmt("llama", dtype=torch.float64, stage=1), tiny_tokenizer()
    fmt, cfg = ChatFormat(tok), GenerationConfig(max_new_tokens=12, eos_token_id=2)
    a = Session(model)
    a.chat(tok, fmt, [{"role": "user", "content": "hello there, memory"}], cfg)
    a.save(tmp_path / "s.safetensors")
    b = Session.load(tmp_path / "s.safetensors", model)
    assert b.history == a.history and b.stats()["tokens"] == a.stats()["tokens"]
    torch.testing.assert_close(b.decoder.state.bank.embeddings, a.decoder.state.bank.embeddings)
    msg = [{"role": "user", "content": "and again"}]
    assert b.chat(tok, fmt, msg, cfg).text == a.chat(tok, fmt, msg, cfg).text
    assert a.stats()["turns"] == 2


def test_session_file_errors(tmp_path):
    from hiermem.inference.sessions import Session

    Session(tiny_hmt("llama")).save(tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="different model"):
        Session.load(tmp_path / "s.safetensors", tiny_hmt("gpt2"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        Session.load(tmp_path / "bad.safetensors", tiny_hmt("llama"))


def test_resending_the_conversation_reads_only_new_messages():
    from hiermem.inference.runtime import ChatFormat
    from hiermem.inference.sessions import Session

    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    fmt, cfg = ChatFormat(tok), GenerationConfig(max_new_tokens=5)
    s = Session(model)
    first = s.chat(tok, fmt, [{"role": "user", "content": "one"}], cfg)
    seen = s.stats()["tokens"]
    again = s.chat(tok, fmt, [{"role": "user", "content": "one"}, {"role": "assistant", "content": first.text},
                              {"role": "user", "content": "two"}], cfg)
    # only the new turn was read: "</s>\n" closing the reply, then the "two" turn and the prompt
    assert again.prompt_tokens == len(tok("</s>\n<s>user\ntwo</s>\n<s>assistant\n", add_special_tokens=False)
                                      ["input_ids"])
    assert s.stats()["tokens"] == seen + again.prompt_tokens + again.completion_tokens


def test_store_lru_ttl_and_persistence(tmp_path):
    import time

    from hiermem.inference.sessions import SessionLimitError, SessionStore

    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    store = SessionStore(model, max_sessions=2, ttl_s=60, directory=tmp_path)
    for sid in ("a", "b"):
        s = store.checkout(sid)
        s.complete(tok, f"text for {sid}", GenerationConfig(max_new_tokens=4))
        store.checkin(s)
    tokens_a = store.get("a").stats()["tokens"]
    store.checkin(store.checkout("c"))  # evicts "a", the least recently used, to disk
    assert list(store.sessions) == ["b", "c"] and (tmp_path / "a.safetensors").exists()
    assert store.get("a").stats()["tokens"] == tokens_a  # restored on use
    busy = [store.checkout(s) for s in list(store.sessions)]
    with pytest.raises(SessionLimitError):
        store.checkout("d")
    for s in busy:
        store.checkin(s)
    store.ttl_s = 0.05
    time.sleep(0.1)
    store.expire()
    assert not store.sessions and not list(tmp_path.glob("*.safetensors"))
    for bad in ("../escape", "abc\n", "a/b/c", "UPPER/x", ""):  # fullmatch: a trailing newline is no id
        with pytest.raises(ConfigError):
            store.checkout(bad)
    store.checkin(store.checkout("ns1/x"))
    store.close()
    assert (tmp_path / "ns1" / "x.safetensors").exists() and store.ids("ns1") == ["x"] and store.ids("ns2") == []


def test_store_over_its_byte_budget_drops_kv_caches_before_sessions():
    from hiermem.inference.sessions import SessionStore

    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    cfg = GenerationConfig(max_new_tokens=6)
    store = SessionStore(model, max_sessions=8)
    s = store.checkout("a")
    s.complete(tok, "a document of some length", cfg)
    seen = s.stats()["tokens"]
    store.max_bytes = state_nbytes(s.decoder) - 1  # the KV cache does not fit, the memory does
    store.checkin(s)
    assert list(store.sessions) == ["a"] and s.decoder.past is None  # the KV cache went, the session stays
    assert s.decoder.state.pending_length > 0  # the unfinished segment waits in the memory to be re-read
    assert s.stats()["tokens"] == seen and s.nbytes <= store.max_bytes
    again = store.checkout("a").complete(tok, " and more", cfg)
    assert s.pending is None and s.stats()["tokens"] == seen + again.prompt_tokens + again.completion_tokens


def test_history_is_capped_and_counted_in_the_session_bytes(tmp_path):
    from hiermem.inference.runtime import ChatFormat
    from hiermem.inference.sessions import Session, SessionStore

    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    fmt, cfg = ChatFormat(tok), GenerationConfig(max_new_tokens=3)
    s = Session(model, history_turns=3, history_bytes=1000)
    for i in range(6):
        s.chat(tok, fmt, [{"role": "user", "content": f"message {i}"}], cfg)
    assert s.stats()["turns"] == 6 and s.stats()["history_turns"] == 3 and len(s.history) == 6
    assert s.history[0]["content"] == "message 3"
    assert s.nbytes == state_nbytes(s.decoder) + s.text_bytes and s.text_bytes > 0
    big = s.chat(tok, fmt, [{"role": "user", "content": "y" * 1500}], cfg)  # one turn over the byte cap
    assert big.prompt_tokens > 1500 and s.history == [] and s.text_bytes == 0
    s.save(tmp_path / "s.safetensors")
    assert Session.load(tmp_path / "s.safetensors", model).stats()["turns"] == 7
    # the store's byte budget counts the chat text: without a's text everything would fit
    store = SessionStore(model, directory=tmp_path)
    held = []
    for sid, text in (("a", "z" * 2000), ("b", "hi")):
        held.append(store.checkout(sid))
        held[-1].chat(tok, fmt, [{"role": "user", "content": text}], cfg)
        held[-1].compact()
    store.checkin(held[0])
    store.max_bytes = sum(h.nbytes for h in held) - held[0].text_bytes // 2
    store.checkin(held[1])
    assert list(store.sessions) == ["b"] and (tmp_path / "a.safetensors").exists()
