"""A real agent client against a live arservice: mini-swe-agent's own `DefaultAgent` loop, with its
`DeterministicModel` replaying pre-written text answers (parsed by mini-swe-agent's own text action
parser, as its text-based models do), runs a SWE-style task in an `ArserviceEnvironment`.

The task: a shell "library" whose `add` subtracts; the agent writes the source and its test with
heredocs, runs the test (fails), reads and fixes the source with sed, shows the change (`git diff`
when git is in the sandbox, `diff -u` otherwise), runs the test (passes), reads a 200 KB log, an
over-cap 1.3 MB one, binary bytes, hits a timeout, and submits the diff. Every observation the agent
gets is checked against what this script expects: output, return code, exception, the rendered text.
Then the environment's protocol edges (cwd/timeout arguments, template variables, serialize, cleanup)
and the client's errors (401, 404, 409) are checked against the server.

Run by tests/real_client.rs with the test bed's venv python; `arservice` must come from the checkout
(PYTHONPATH). Exit status 0 when everything matched; a failed check raises with what differed.
"""

import argparse
import base64
import hashlib
import json
import os
import platform
import sys
import time
import uuid

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

import arservice
import yaml
from arservice import ArserviceClient, ArserviceError
from arservice.minisweagent import ArserviceEnvironment
from minisweagent import __version__ as MSWEA_VERSION
from minisweagent.agents.default import DefaultAgent
from minisweagent.config import builtin_config_dir
from minisweagent.models.test_models import DeterministicModel, make_output
from minisweagent.models.utils.actions_text import parse_regex_actions

ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
"""The action format of mini-swe-agent's text-based models (`LitellmTextbasedModelConfig.action_regex`)."""

COMMAND_TIMEOUT = 6
"""The environment's per-command timeout: the timeout step runs into it."""

SUBMIT = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"

CALC_BUGGY = """#!/bin/sh
# calc.sh: a tiny calculator library
add() {
  echo $(( $1 - $2 ))
}
mul() {
  echo $(( $1 * $2 ))
}
"""
CALC_FIXED = CALC_BUGGY.replace("$1 - $2", "$1 + $2")

TEST_CALC = """#!/bin/sh
echo "running tests" >&2
. ./calc.sh
fails=0
check() {
  if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected $3, got $2"; fails=$((fails + 1)); fi
}
check "add 2 3" "$(add 2 3)" 5
check "mul 4 5" "$(mul 4 5)" 20
check "add -1 1" "$(add -1 1)" 0
echo "$fails failed"
[ "$fails" -eq 0 ]
"""

GIT = "git -c init.defaultBranch=main -c user.name=agent -c user.email=agent@example.com"


def blob_id(text: str) -> str:
    """git's abbreviated object id of a file with this content."""
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:7]


def hunk(fixed_line: str) -> str:
    return (
        "@@ -1,7 +1,7 @@\n"
        " #!/bin/sh\n"
        " # calc.sh: a tiny calculator library\n"
        " add() {\n"
        "-  echo $(( $1 - $2 ))\n"
        f"+{fixed_line}\n"
        " }\n"
        " mul() {\n"
        "   echo $(( $1 * $2 ))\n"
    )


def response(thought: str, command: str) -> str:
    """An answer as a text-based model writes it: a THOUGHT and one fenced command."""
    return f"THOUGHT: {thought}\n\n```mswea_bash_command\n{command}\n```\n"


def capped(data: str, cap: int) -> str:
    """What the server answers for `data` (ASCII) under an output cap of `cap` bytes."""
    if len(data) <= cap:
        return data
    head, tail = cap // 2, cap - cap // 2
    return f"{data[:head]}\n[... {len(data) - cap} bytes of output omitted ...]\n{data[-tail:]}"


def seq(first: int, last: int) -> str:
    return "".join(f"{i}\n" for i in range(first, last + 1))


def timeout_info(command: str, timeout: int) -> str:
    return f"An error occurred while executing the command: Command '{command}' timed out after {timeout} seconds"


def scenario(has_git: bool, cap: int) -> list[tuple[str, dict]]:
    """(answer text, expected observation) for every step; the last one submits."""
    binary = bytes(range(256)) + "\nh\u00e9llo \u2713\n".encode()
    steps = [
        (
            response(
                "Create the library with a heredoc.",
                f"mkdir -p proj && cd proj && cat <<'EOF' > calc.sh\n{CALC_BUGGY}EOF\necho wrote calc.sh",
            ),
            {"output": "wrote calc.sh\n", "returncode": 0},
        ),
        (
            response(
                "Add a test script, also with a heredoc.",
                f"cd proj && cat <<'EOF' > test_calc.sh\n{TEST_CALC}EOF\nchmod +x test_calc.sh && wc -l < test_calc.sh",
            ),
            {"output": f"{TEST_CALC.count(chr(10))}\n", "returncode": 0},
        ),
    ]
    if has_git:
        steps.append(
            (
                response(
                    "Record the starting point in git.",
                    f"cd proj && {GIT} init -q && git add . && {GIT} commit -qm base && git log --oneline | wc -l",
                ),
                {"output": "1\n", "returncode": 0},
            )
        )
    else:
        steps.append(
            (
                response(
                    "No git here: keep a copy to diff against.", "cd proj && cp calc.sh calc.sh.orig && echo saved"
                ),
                {"output": "saved\n", "returncode": 0},
            )
        )
    failing = (
        "running tests\nFAIL add 2 3: expected 5, got -1\nok   mul 4 5\nFAIL add -1 1: expected 0, got -2\n2 failed\n"
    )
    passing = "running tests\nok   add 2 3\nok   mul 4 5\nok   add -1 1\n0 failed\n"
    if has_git:
        diff_cmd = "git diff"
        diff = (
            "diff --git a/calc.sh b/calc.sh\n"
            f"index {blob_id(CALC_BUGGY)}..{blob_id(CALC_FIXED)} 100644\n"
            "--- a/calc.sh\n+++ b/calc.sh\n" + hunk("  echo $(( $1 + $2 ))")
        )
        diff_rc = 0
    else:
        diff_cmd = "diff -u -L a/calc.sh -L b/calc.sh calc.sh.orig calc.sh"
        diff = "--- a/calc.sh\n+++ b/calc.sh\n" + hunk("  echo $(( $1 + $2 ))")
        diff_rc = 1
    timeout_cmd = "cd proj && echo started && (sleep 300 &) && sleep 60 && echo never"
    steps += [
        (
            response("Run the tests to see the failure.", "cd proj && ./test_calc.sh"),
            {"output": failing, "returncode": 1},
        ),
        (
            response("Find the add function.", "cd proj && grep -n 'echo' calc.sh"),
            {"output": "4:  echo $(( $1 - $2 ))\n7:  echo $(( $1 * $2 ))\n", "returncode": 0},
        ),
        (
            response(
                "add subtracts: fix it with sed.",
                "cd proj && sed -i 's/\\$1 - \\$2/$1 + $2/' calc.sh && sed -n 4p calc.sh",
            ),
            {"output": "  echo $(( $1 + $2 ))\n", "returncode": 0},
        ),
        (
            response("Review the change.", f"cd proj && {diff_cmd}"),
            {"output": diff, "returncode": diff_rc},
        ),
        (
            response("A 200 KB log, above 64 KiB.", "cd proj && seq 1 40000 > big.log && cat big.log"),
            {"output": seq(1, 40000), "returncode": 0},
        ),
        (
            response("A log above the server's output cap.", "seq 1 200000"),
            {"output": capped(seq(1, 200000), cap), "returncode": 0, "truncated": True},
        ),
        (
            response("Binary bytes and UTF-8.", f"echo {base64.b64encode(binary).decode()} | base64 -d"),
            {"output": binary.decode("utf-8", errors="replace"), "returncode": 0},
        ),
        (
            response("Something that hangs, with a job left in the background.", timeout_cmd),
            {
                "output": "started\n",
                "returncode": -1,
                "exception_info": timeout_info(timeout_cmd, COMMAND_TIMEOUT),
                "timed_out": True,
            },
        ),
        (
            response("The instance still works; run the tests again.", "cd proj && ./test_calc.sh"),
            {"output": passing, "returncode": 0},
        ),
        (
            response("Done: submit the diff.", f"cd proj && echo {SUBMIT} && {{ {diff_cmd}; true; }}"),
            {"submission": diff},
        ),
    ]
    return steps


def observation_text(expected: dict) -> str:
    """The observation as DeterministicModel's default template renders it."""
    exception = expected.get("exception_info", "")
    prefix = f"<exception>{exception}</exception>\n" if exception else ""
    return f"{prefix}<returncode>{expected['returncode']}</returncode>\n<output>\n{expected['output']}</output>"


def check(condition: bool, what: str):
    if not condition:
        raise AssertionError(what)


def check_equal(actual, expected, what: str):
    if actual == expected:
        return
    if isinstance(actual, str) and isinstance(expected, str) and max(len(actual), len(expected)) > 400:
        at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
        window = slice(max(0, at - 100), at + 100)
        raise AssertionError(
            f"{what}: {len(actual)} chars, expected {len(expected)}; first difference at {at}:"
            f" got ...{actual[window]!r}..., expected ...{expected[window]!r}..."
        )
    raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


def run_agent(args, client: ArserviceClient) -> None:
    config = yaml.safe_load((builtin_config_dir / "mini_textbased.yaml").read_text())
    env_kwargs = {
        "container_type": args.container_type,
        "image": args.image,
        "cwd": args.cwd,
        "timeout": COMMAND_TIMEOUT,
        "url": args.url,
        "run_id": f"mswea-{args.container_type}-{uuid.uuid4().hex[:8]}",
        "env": config["environment"]["env"],
        "forward_env": ["ARS_TEST_FORWARDED", "ARS_TEST_UNSET"],
    }
    os.environ["ARS_TEST_FORWARDED"] = "from-client"
    os.environ.pop("ARS_TEST_UNSET", None)
    env = ArserviceEnvironment(**env_kwargs)
    run_id = env.run_id
    stats = client.stats(run_id=run_id)["instances"]
    check_equal([i["run_id"] for i in stats], [run_id], "the started instance in /stats")
    if args.container_type != "local":
        check_equal(stats[0].get("exec_mode"), args.exec_mode, "exec_mode in /stats")

    # Is git in the sandbox? Asked through the environment, as a user's script would.
    probe = env.execute({"command": "command -v git >/dev/null && echo yes || echo no"})
    check(probe["output"] in ("yes\n", "no\n"), f"git probe: {probe}")
    has_git = probe["output"] == "yes\n"
    steps = scenario(has_git, args.cap)
    model = DeterministicModel(
        outputs=[
            make_output(text, parse_regex_actions(text, action_regex=ACTION_REGEX, format_error_template="{{error}}"))
            for text, _ in steps
        ]
    )
    agent = DefaultAgent(model, env, **{**config["agent"], "step_limit": len(steps) + 1, "cost_limit": 0})
    started = time.monotonic()
    result = agent.run("calc.sh's add subtracts instead of adding; fix it so that ./test_calc.sh passes.")
    elapsed = time.monotonic() - started

    # The instance template was rendered with the sandbox's uname (StrictUndefined: all keys present).
    uname = env.get_template_vars()
    for key in ("system", "node", "release", "version", "machine", "processor"):
        check(key in uname, f"template var {key} missing: {uname}")
    check_equal(uname["system"], "Linux", "the sandbox's system")
    check_equal(uname["release"], platform.uname().release, "the sandbox's kernel release (same kernel)")
    if args.container_type == "local":
        check_equal(uname["node"], platform.uname().node, "node of a local sandbox")
    else:
        check(uname["node"] != platform.uname().node, f"node {uname['node']!r} is the host's, not the container's")
    check(
        f"{uname['system']} {uname['release']} {uname['version']} {uname['machine']}" in agent.messages[1]["content"],
        "the instance template shows the sandbox's uname",
    )
    token = os.environ["ARS_TOKEN"]
    check(token not in str(uname), "the token is in the template variables")
    check(token not in json.dumps(agent.serialize()), "the token is in the trajectory")

    # Every observation, in order: system, task, then (answer, observation) per step; the last
    # step submits, so its observation is the exit message.
    messages = agent.messages
    check_equal(len(messages), 2 + 2 * len(steps), "number of messages")
    check_equal([m["role"] for m in messages[:2]], ["system", "user"], "first roles")
    for index, (text, expected) in enumerate(steps):
        answer, observation = messages[2 + 2 * index], messages[3 + 2 * index]
        check_equal(answer["role"], "assistant", f"step {index} answer role")
        check_equal(answer["content"], text, f"step {index} answer")
        if "submission" in expected:
            check_equal(observation["role"], "exit", "the last step's message")
            check_equal(observation["content"], expected["submission"], "the submission")
            continue
        what = f"step {index} ({answer['extra']['actions'][0]['command'][:40]!r})"
        extra = observation["extra"]
        check_equal(observation["role"], "user", f"{what}: observation role")
        check_equal(extra["raw_output"], expected["output"], f"{what}: output")
        check_equal(extra["returncode"], expected["returncode"], f"{what}: returncode")
        check_equal(extra["exception_info"] or "", expected.get("exception_info", ""), f"{what}: exception_info")
        check_equal(extra.get("truncated"), expected.get("truncated", False), f"{what}: truncated")
        check_equal(extra.get("timed_out"), expected.get("timed_out", False), f"{what}: timed_out")
        check_equal(observation["content"], observation_text(expected), f"{what}: the observation text")
    check_equal(result, {"exit_status": "Submitted", "submission": steps[-1][1]["submission"]}, "the agent's result")

    # The environment's own arguments: cwd, timeout; env and forward_env from the config.
    out = env.execute({"command": "pwd"}, cwd="/tmp")
    check_equal((out["output"], out["returncode"]), ("/tmp\n", 0), "execute(cwd='/tmp')")
    out = env.execute({"command": "echo $PAGER $ARS_TEST_FORWARDED ${ARS_TEST_UNSET-unset}"})
    check_equal(out["output"], "cat from-client unset\n", "env and forward_env")
    out = env.execute({"command": "sleep 30"}, timeout=1)
    check_equal(
        (out["output"], out["returncode"], out["exception_info"]),
        ("", -1, timeout_info("sleep 30", 1)),
        "execute(timeout=1)",
    )
    if args.cwd:
        out = env.execute({"command": "pwd"})
        check_equal(out["output"], f"{args.cwd}\n", "the config's cwd")
    direct = 4 if args.cwd else 3
    # uname + the git probe + every step + the direct calls: each reached the server exactly once.
    num_cmd = client.stats(run_id=run_id)["instances"][0]["num_cmd"]
    check_equal(num_cmd, 2 + len(steps) + direct, "commands the server ran")

    # The client's errors, with the server's words.
    try:
        client.start_instance(run_id, env_kwargs["image"] or "local", {"container_type": args.container_type})
        raise AssertionError("a second start of one run_id succeeded")
    except ArserviceError as e:
        check_equal(e.status, 409, f"duplicate start: {e}")
    try:
        ArserviceClient(args.url, token="wrong").execute_command(run_id, "true")
        raise AssertionError("a wrong token was accepted")
    except ArserviceError as e:
        check_equal(e.status, 401, f"wrong token: {e}")
        check("Authorization: Bearer" in e.detail, f"401 detail: {e.detail}")

    env.cleanup()
    check_equal(client.stats(run_id=run_id)["instances"], [], "instances after cleanup")
    env.cleanup()  # a second cleanup does nothing
    try:
        client.execute_command(run_id, "true")
        raise AssertionError("a command on a closed instance ran")
    except ArserviceError as e:
        check_equal(e.status, 404, f"command after close: {e}")
    # A failed request is an observation (returncode -1, exception_info), as a failed `docker exec`
    # is in mini-swe-agent's own environments; cleanup of an instance closed elsewhere is quiet.
    other = ArserviceEnvironment(**{**env_kwargs, "run_id": f"{run_id}-closed"})
    client.close_instance(other.run_id)
    failed = other.execute({"command": "true"})
    check_equal(failed["returncode"], -1, "a command on an instance closed elsewhere: returncode")
    check("answered 404" in failed["exception_info"], f"a command on a closed instance: {failed['exception_info']}")
    other.cleanup()
    check_equal(other.run_id, None, "cleanup after a close elsewhere")

    sizes = sum(len(m["extra"].get("raw_output", "")) for m in messages if m["role"] == "user" and "extra" in m)
    print(
        f"ok: mini-swe-agent {MSWEA_VERSION} DefaultAgent, {len(steps)} steps on {args.container_type}"
        f" ({'git diff' if has_git else 'diff -u'}), {sizes} bytes of observations checked, {elapsed:.1f} s;"
        f" arservice client from {os.path.dirname(arservice.__file__)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--container-type", required=True)
    parser.add_argument("--image", default="")
    parser.add_argument("--cwd", default="")
    parser.add_argument("--exec-mode", default="agent", help="expected exec_mode in /stats (not for local)")
    parser.add_argument("--cap", type=int, required=True, help="the server's --max-output-bytes")
    args = parser.parse_args()
    client = ArserviceClient(args.url)  # the token from $ARS_TOKEN
    check(client.healthz(), f"no server at {args.url}")
    run_agent(args, client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
