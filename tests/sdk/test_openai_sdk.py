"""The official OpenAI Python SDK (`openai` from PyPI) against pg-quota-relay.

A client written for OpenAI must work unchanged through the relay: plain and streamed chat
completions arrive as the SDK's own objects and are charged in the ledger exactly as the
upstream reported them, and a spent quota raises the SDK's `RateLimitError` with our code.

Needs PGQ_RELAY_URL (a relay with the mock upstream behind it) and PGQ_SDK_DSN (a libpq
connection string of the relay's database, used with psql for set-up and checks).
scripts/test.sh starts both. Run with `python3 tests/sdk/test_openai_sdk.py` (prints
"sdk: N passed, N failed") or with pytest.
"""

import functools
import os
import re
import subprocess
import sys
import time
import traceback

import openai

MODEL = "gpt-4o"


def sql(query):
    """One statement through psql; its result as unaligned text."""
    out = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", os.environ["PGQ_SDK_DSN"], "-c", query],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def new_key(user, policy_values):
    """A user with one key and one policy (metric, period, quota_limit, boundary); the secret."""
    user_id = sql(f"SELECT quota.create_user('{user}')")
    sql(
        "INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary) "
        f"VALUES ('user', {user_id}, {policy_values})"
    )
    return sql(f"SELECT quota.create_key({user_id}, 'sdk')")


@functools.cache
def prices():
    sql(
        "INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) "
        f"VALUES ('{MODEL}', 2.50, 10.00) ON CONFLICT (model) DO NOTHING"
    )


@functools.cache
def client():
    """A client with a generous key. No retries: the relay's answers are what is tested."""
    prices()
    key = new_key("sdk-main", "'tokens', 'day', 1000000, 'strict'")
    return openai.OpenAI(base_url=os.environ["PGQ_RELAY_URL"] + "/v1", api_key=key, max_retries=0)


def ledger(request_id):
    """(input_tokens, output_tokens, cost) of a request once it is settled (within 5 s)."""
    assert re.fullmatch(r"req_[0-9a-f]+", request_id or ""), request_id
    deadline = time.monotonic() + 5
    while True:
        row = sql(
            "SELECT input_tokens, output_tokens, cost FROM quota.usage_ledger "
            f"WHERE request_id = '{request_id}'"
        )
        if row:
            i, o, cost = row.split("|")
            return int(i), int(o), cost
        assert time.monotonic() < deadline, f"no ledger row for {request_id}"
        time.sleep(0.05)


def cost_is(cost, expected):
    return sql(f"SELECT '{cost}'::numeric = '{expected}'::numeric") == "t"


def test_chat_completion():
    completion = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=50,
        extra_headers={"x-mock-input-tokens": "40", "x-mock-output-tokens": "12"},
    )
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].message.content
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (40, 12)
    input_tokens, output_tokens, cost = ledger(completion._request_id)
    assert (input_tokens, output_tokens) == (40, 12)
    assert cost_is(cost, "0.00022"), cost  # 40 × $2.50/M + 12 × $10/M


def test_streamed_chat_completion():
    stream = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream, please."}],
        max_tokens=50,
        stream=True,
        extra_headers={
            "x-mock-input-tokens": "25",
            "x-mock-output-tokens": "15",
            "x-mock-chunk-delay-ms": "30",
        },
    )
    request_id = stream.response.headers["x-request-id"]
    arrivals, content = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        assert chunk.usage is None, "the client did not ask for usage"
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
    assert len(content) == 15, content
    assert arrivals[-1] - arrivals[0] >= 0.3, "chunks arrive as they are produced"
    input_tokens, output_tokens, cost = ledger(request_id)
    assert (input_tokens, output_tokens) == (25, 15)
    assert cost_is(cost, "0.0002125"), cost  # 25 × 2.50 + 15 × 10, per million

    # With include_usage the SDK sees the final usage chunk, the one that was charged.
    stream = client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Again."}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-input-tokens": "26", "x-mock-output-tokens": "16"},
    )
    request_id = stream.response.headers["x-request-id"]
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (26, 16), usage
    assert ledger(request_id)[:2] == (26, 16)


def test_spent_key_raises_rate_limit_error():
    prices()
    key = new_key("sdk-spent", "'requests', 'day', 1, 'strict'")
    spent = openai.OpenAI(base_url=os.environ["PGQ_RELAY_URL"] + "/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    spent.chat.completions.create(model=MODEL, messages=messages)
    try:
        spent.chat.completions.create(model=MODEL, messages=messages)
    except openai.RateLimitError as e:
        assert e.status_code == 429
        assert e.code == "token_quota_policy_exhausted", e.code
        assert e.type == "rate_limit_error", e.type
        assert int(e.response.headers["retry-after"]) >= 1
    else:
        raise AssertionError("the second request of a 1-request quota must raise RateLimitError")


def test_unknown_key_raises_authentication_error():
    stranger = openai.OpenAI(
        base_url=os.environ["PGQ_RELAY_URL"] + "/v1", api_key="sk-pgq-nobody-nothing", max_retries=0
    )
    try:
        stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e.code
    else:
        raise AssertionError("an unknown key must raise AuthenticationError")


if __name__ == "__main__":
    tests = [(name, f) for name, f in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for name, test in tests:
        try:
            test()
            print(f"{name} ... ok", flush=True)
        except Exception:
            failed += 1
            print(f"{name} ... FAILED", flush=True)
            traceback.print_exc()
    print(f"sdk: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
