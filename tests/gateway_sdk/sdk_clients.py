"""The official OpenAI and Anthropic Python SDKs against the model gateway (run by
tests/gateway.rs, `official_sdks_see_cut_streams_unknown_paths_and_timeouts_as_errors`).

The server's upstreams `oa` and `an` are fakes that answer by model: `ok` a whole answer, `cut`
a stream that closes before its last event, `slow` nothing before --model-timeout. Each check
prints one line; the last line is `PASS` when all held. The SDKs keep their default retries
(max_retries=2), so a 504 without `x-should-retry: false` would be sent three times.
"""

import argparse
import sys

import anthropic
import openai

failures = []


def check(name, condition, detail=""):
    print(("ok   " if condition else "FAIL ") + name + (": " + detail if detail else ""))
    if not condition:
        failures.append(name)


def raises(name, call, kind, needle):
    """Runs `call`, which must raise `kind` with `needle` in its text."""
    try:
        call()
    except kind as error:
        # What the SDK shows: `Error code: 404` alone when the body has no error.message.
        text = str(error)
        check(name, needle in text, text[:300])
        return
    except Exception as error:  # noqa: BLE001 - reported, not raised
        check(name, False, f"raised {type(error).__name__}: {error}")
        return
    check(name, False, "raised nothing")


def openai_checks(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="arservice-token")
    messages = [{"role": "user", "content": "Say hi"}]
    answer = client.chat.completions.create(model="oa/ok", messages=messages)
    check("openai: a whole answer", answer.choices[0].message.content == "Hi")
    raises("openai: models.list() is a readable 404", lambda: client.models.list(),
           openai.NotFoundError, "POST /v1/chat/completions")

    def cut():
        for _ in client.chat.completions.create(model="oa/cut", messages=messages, stream=True):
            pass

    raises("openai: a cut stream raises", cut, openai.APIError, "closed its stream before")
    raises("openai: --model-timeout is a 504, not retried",
           lambda: client.chat.completions.create(model="oa/slow", messages=messages),
           openai.InternalServerError, "did not answer within --model-timeout")


def anthropic_checks(url):
    client = anthropic.Anthropic(base_url=url, api_key="arservice-token")
    messages = [{"role": "user", "content": "Say hi"}]
    answer = client.messages.create(model="an/ok", max_tokens=16, messages=messages)
    check("anthropic: a whole answer", answer.content[0].text == "Hi")
    raises("anthropic: models.list() is a readable 404", lambda: client.models.list(),
           anthropic.NotFoundError, "POST /v1/messages")

    def cut():
        stream = client.messages.create(model="an/cut", max_tokens=16, messages=messages,
                                        stream=True)
        for _ in stream:
            pass

    raises("anthropic: a cut stream raises", cut, anthropic.APIError, "closed its stream before")
    raises("anthropic: --model-timeout is a 504, not retried",
           lambda: client.messages.create(model="an/slow", max_tokens=16, messages=messages),
           anthropic.InternalServerError, "did not answer within --model-timeout")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    openai_checks(args.url)
    anthropic_checks(args.url)
    print("PASS" if not failures else "FAILED: " + ", ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
