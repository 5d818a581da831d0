"""Scripted models for the offline demo and the tests.

:class:`DemoModel` plays a disciplined Ralph agent with real tool calls. It reads the prompt
ralph-uv rendered (the first lines are always ``# Ralph loop — iteration N`` followed by
``- Key: value`` lines), and decides each step from the conversation so far, so it keeps no state
between requests:

1. write the story's deliverable with the client's *write* tool;
2. run one shell command with the client's *bash* tool that marks the story as passing in the PRD,
   appends a dated entry to the progress file, commits, and prints how many stories still fail;
3. answer with a summary, ending with ``<promise>COMPLETE</promise>`` only when that command
   printed ``Stories still failing: 0``.

Tool names and argument names are read from the request's ``tools`` array (Claude Code offers
``Write {file_path, content}`` and ``Bash {command, description}``; OpenCode ``write {filePath,
content}`` and ``bash {command, description}``), so the same script drives either client.

The other models are scenarios for tests: :class:`EchoCompleteModel` quotes the prompt (marker
included) without doing any work, :class:`NoProgressModel` answers without changing anything,
and :class:`SlowModel` delays another model's replies.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ralph_uv.demo.sample_code import Deliverable, deliverable_for

__all__ = [
    "COMPLETE_MARKER",
    "DemoModel",
    "EchoCompleteModel",
    "ModelReply",
    "NoProgressModel",
    "RalphPrompt",
    "ScriptedModel",
    "SlowModel",
    "TextBlock",
    "ToolUseBlock",
    "find_ralph_prompt",
]

COMPLETE_MARKER = "<promise>COMPLETE</promise>"
_HEADER = re.compile(r"^# Ralph loop — iteration (\d+)\s*$", re.MULTILINE)
_FIELD = re.compile(r"^- ([A-Za-z ]+): ?(.*)$")
_REMAINING = re.compile(r"Stories still failing: (\d+)")
_LINE_NUMBER = re.compile(r"^ *\d+(?:\t|→)", re.MULTILINE)
_PROMPT_FILE = re.compile(r"(/[^\s`'\"]+\.(?:md|txt))")
_WORKDIR = re.compile(r"working directory: *(\S[^\n]*)", re.IGNORECASE)

# Marks the story (and any acceptance criteria that carry a flag) as passing, keeping every
# other field, and prints the story's title for the commit message.
_MARK_PASSING = (
    "import json,sys; p,i=sys.argv[1:3]; d=json.load(open(p)); "
    "s=next(s for s in d['userStories'] if s['id']==i); s['passes']=True; "
    "[c.update(passes=True) for c in s.get('acceptanceCriteria',[]) "
    "if isinstance(c,dict) and 'passes' in c]; "
    "open(p,'w').write(json.dumps(d,indent=2,ensure_ascii=False)+chr(10)); "
    "print(s.get('title') or i)"
).replace("'", '"')
_COUNT_FAILING = (
    "import json,sys; d=json.load(open(sys.argv[1])); "
    "print('Stories still failing:', sum(1 for s in d['userStories'] if not s.get('passes')))"
).replace("'", '"')


@dataclass(frozen=True, slots=True)
class TextBlock:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelReply:
    """One assistant message: its content blocks and why it stopped."""

    content: tuple[TextBlock | ToolUseBlock, ...]
    stop_reason: str = "end_turn"

    @classmethod
    def text(cls, text: str) -> ModelReply:
        return cls((TextBlock(text),), "end_turn")

    @property
    def tool_calls(self) -> list[ToolUseBlock]:
        return [block for block in self.content if isinstance(block, ToolUseBlock)]

    @property
    def full_text(self) -> str:
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))

    def output_tokens(self) -> int:
        size = sum(
            len(block.text) if isinstance(block, TextBlock) else len(json.dumps(block.input))
            for block in self.content
        )
        return max(1, size // 4)


@dataclass(frozen=True, slots=True)
class RalphPrompt:
    """The fields of a prompt rendered by ralph-uv (the ``- Key: value`` lines of its header)."""

    iteration: int
    fields: Mapping[str, str]
    text: str

    @property
    def story_id(self) -> str:
        return self.fields.get("story", "")

    @property
    def prd_file(self) -> str:
        return self.fields.get("prd file", "")

    @property
    def progress_file(self) -> str:
        return self.fields.get("progress file", "")

    @property
    def task_dir(self) -> str:
        return self.fields.get("task directory", "")


@dataclass(frozen=True, slots=True)
class _Tool:
    name: str
    properties: tuple[str, ...]

    def prop(self, *candidates: str, default: str) -> str:
        """The schema's name for an argument: exact match first, then a case-insensitive one."""
        lowered = {p.lower().replace("_", ""): p for p in self.properties}
        for candidate in candidates:
            if candidate in self.properties:
                return candidate
            if candidate.lower().replace("_", "") in lowered:
                return lowered[candidate.lower().replace("_", "")]
        return default


@dataclass(slots=True)
class _Conversation:
    calls: list[ToolUseBlock] = field(default_factory=list)
    results: dict[str, tuple[str, bool]] = field(default_factory=dict)  # id -> (text, is_error)

    def calls_to(self, tool: _Tool | None) -> list[ToolUseBlock]:
        return [] if tool is None else [c for c in self.calls if c.name == tool.name]

    def result_of(self, call: ToolUseBlock) -> tuple[str, bool] | None:
        return self.results.get(call.id)


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(parts)
    return ""


def _user_texts(messages: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The text of each user message, then of each tool result (a prompt read from a file)."""
    results: list[str] = []
    for message in messages:
        if message.get("role") != "user":
            continue
        yield _text_of(message.get("content"))
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                # File-reading tools number the lines ("   12\t…" or "12→…"); drop the numbers.
                results.append(_LINE_NUMBER.sub("", _text_of(block.get("content"))))
    yield from results


def find_ralph_prompt(messages: Sequence[Mapping[str, Any]]) -> RalphPrompt | None:
    """The ralph-uv prompt in the conversation's user messages (first one first), or in a file
    the agent read, if any."""
    for text in _user_texts(messages):
        match = _HEADER.search(text)
        if match is None:
            continue
        fields: dict[str, str] = {}
        for line in text[match.end() :].lstrip("\n").splitlines():
            found = _FIELD.match(line)
            if found is None:
                break
            fields[found.group(1).strip().lower()] = found.group(2).strip()
        return RalphPrompt(int(match.group(1)), fields, text[match.start() :])
    return None


def _tool(tools: object, name: str) -> _Tool | None:
    if not isinstance(tools, list):
        return None
    for tool in tools:
        if isinstance(tool, dict) and str(tool.get("name", "")).lower() == name:
            schema = tool.get("input_schema") or {}
            props = schema.get("properties") if isinstance(schema, dict) else None
            return _Tool(str(tool["name"]), tuple(props) if isinstance(props, dict) else ())
    return None


def _conversation(messages: Sequence[Mapping[str, Any]]) -> _Conversation:
    conv = _Conversation()
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use" and message.get("role") == "assistant":
                raw_input = block.get("input")
                conv.calls.append(
                    ToolUseBlock(str(block.get("id")), str(block.get("name")),
                                 raw_input if isinstance(raw_input, dict) else {})
                )
            elif block.get("type") == "tool_result":
                text = _text_of(block.get("content"))
                conv.results[str(block.get("tool_use_id"))] = (text, bool(block.get("is_error")))
    return conv


def _system_text(body: Mapping[str, Any]) -> str:
    return _text_of(body.get("system"))


def _tool_id(*parts: object) -> str:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()
    return f"toolu_{digest[:24]}"


class ScriptedModel(abc.ABC):
    """Decides the assistant's next message from a ``/v1/messages`` request body."""

    name = "scripted"

    @abc.abstractmethod
    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        """The reply to one request; must depend only on the request."""

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        return self.decide(body)


_TITLE = "Ralph demo iteration"
_JSON_DEFAULTS: dict[str, Any] = {"boolean": False, "integer": 0, "number": 0, "array": [],
                                  "object": {}, "null": None}


def _schema_answer(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal object that satisfies a JSON schema's required properties."""
    props = schema.get("properties") or {}
    answer: dict[str, Any] = {}
    for name in schema.get("required") or list(props):
        kind = (props.get(name) or {}).get("type", "string")
        answer[name] = (_TITLE if "title" in name.lower() else "ok") if kind == "string" \
            else _JSON_DEFAULTS.get(kind)
    return answer


def _side_answer(body: Mapping[str, Any]) -> ModelReply:
    """Requests without tools are the client's own chores: titles, summaries, quota checks.

    When the request asks for JSON output (Claude Code's title request does), the answer is a
    JSON object that fits the schema.
    """
    output = body.get("output_config")
    fmt = output.get("format") if isinstance(output, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return ModelReply.text(json.dumps(_schema_answer(schema if isinstance(schema, dict)
                                                         else {})))
    if "title" in _system_text(body).lower():
        return ModelReply.text(_TITLE)
    return ModelReply.text("OK")


class DemoModel(ScriptedModel):
    """A scripted Ralph agent: write the deliverable, mark the story and commit, summarise."""

    name = "demo"

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not body.get("tools"):
            return _side_answer(body)
        prompt = find_ralph_prompt(messages)
        if prompt is None:
            read = self._read_prompt_file(body, messages)
            if read is not None:
                return read
            return ModelReply.text(
                "I am the ralph-uv demo model: I only work on prompts rendered by ralph-uv "
                "(starting with '# Ralph loop — iteration N')."
            )
        if not prompt.story_id or not prompt.prd_file:
            return ModelReply.text("The prompt names no story or PRD file, so there is nothing "
                                   "for me to do in this iteration.")
        write_tool = _tool(body.get("tools"), "write")
        bash_tool = _tool(body.get("tools"), "bash")
        if bash_tool is None:
            return ModelReply.text("This client offers no shell tool, so I cannot commit work.")
        conv = _conversation(messages)
        workdir = self._workdir(body, prompt)
        deliverable = deliverable_for(prompt.story_id, prompt.iteration, prompt.prd_file)
        writes = conv.calls_to(write_tool)
        if write_tool is not None and not writes:
            return self._write(write_tool, deliverable, workdir, prompt)
        bashes = conv.calls_to(bash_tool)
        if not bashes:
            failed = [w for w in writes if (conv.result_of(w) or ("", True))[1]]
            must_write = write_tool is None or bool(failed)
            return self._commit(bash_tool, deliverable, prompt, must_write)
        return self._summary(prompt, deliverable, conv.result_of(bashes[-1]))

    def _read_prompt_file(
        self, body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]
    ) -> ModelReply | None:
        """A prompt too long for the command line is handed over as a file to read: read it."""
        read_tool = _tool(body.get("tools"), "read")
        first = next((m for m in messages if m.get("role") == "user"), None)
        found = _PROMPT_FILE.search(_text_of(first.get("content"))) if first else None
        if read_tool is None or found is None or _conversation(messages).calls_to(read_tool):
            return None
        path_arg = read_tool.prop("file_path", "filePath", "path", default="file_path")
        args: dict[str, Any] = {path_arg: found.group(1)}
        if "limit" in read_tool.properties:
            args["limit"] = 100  # the header is at the top; the rest may exceed the tool's cap
        call = ToolUseBlock(_tool_id("read", found.group(1)), read_tool.name, args)
        return ModelReply((TextBlock("My instructions are in a file; reading it."), call),
                          "tool_use")

    def _workdir(self, body: Mapping[str, Any], prompt: RalphPrompt) -> PurePosixPath | None:
        found = _WORKDIR.search(_system_text(body))
        if found:
            return PurePosixPath(found.group(1).strip())
        for message in body.get("messages") or []:
            match = _WORKDIR.search(_text_of(message.get("content")))
            if match:
                return PurePosixPath(match.group(1).strip())
        return None

    def _write(
        self, tool: _Tool, item: Deliverable, workdir: PurePosixPath | None, prompt: RalphPrompt
    ) -> ModelReply:
        path = PurePosixPath(item.path)
        if not path.is_absolute() and workdir is not None:
            path = workdir / path
        args = {
            tool.prop("file_path", "filePath", "path", default="file_path"): str(path),
            tool.prop("content", default="content"): item.content,
        }
        intro = TextBlock(f"Working on {prompt.story_id}: I will write {item.path}.")
        call = ToolUseBlock(_tool_id(prompt.story_id, prompt.iteration, "write"), tool.name, args)
        return ModelReply((intro, call), "tool_use")

    def _commit(
        self, tool: _Tool, item: Deliverable, prompt: RalphPrompt, must_write: bool
    ) -> ModelReply:
        q = shlex.quote
        lines = [f"prd={q(prompt.prd_file)}; story={q(prompt.story_id)}"]
        if must_write:
            # The write tool was missing or refused; write the file from the shell instead.
            lines.append(
                f"mkdir -p {q(str(PurePosixPath(item.path).parent))} && "
                f"printf '%s' {q(item.content)} > {q(item.path)}"
            )
        if item.check:
            lines.append(item.check)
        lines.append(f"title=$(python3 -c '{_MARK_PASSING}' \"$prd\" \"$story\")")
        progress = prompt.progress_file or str(
            PurePosixPath(prompt.prd_file).parent / "progress.txt"
        )
        lines.append(
            "printf '\\n## %s - %s: %s\\n- Wrote %s\\n' \"$(date -u '+%Y-%m-%d %H:%M UTC')\" "
            f"\"$story\" \"$title\" {q(item.path)} >> {q(progress)}"
        )
        lines.append("git add -A")
        lines.append(
            "{ git commit -q -m \"$story: $title\" || git -c user.name='Ralph demo' "
            "-c user.email=ralph-demo@localhost commit -q -m \"$story: $title\"; }"
        )
        lines.append(f"python3 -c '{_COUNT_FAILING}' \"$prd\"")
        command = " &&\n".join(lines)
        args: dict[str, Any] = {tool.prop("command", default="command"): command}
        if any(p.lower() == "description" for p in tool.properties):
            args[tool.prop("description", default="description")] = (
                f"Mark {prompt.story_id} as passing, log progress and commit"
            )
        intro = TextBlock(f"Now I mark {prompt.story_id} as passing and commit the work.")
        call = ToolUseBlock(_tool_id(prompt.story_id, prompt.iteration, "bash"), tool.name, args)
        return ModelReply((intro, call), "tool_use")

    def _summary(
        self, prompt: RalphPrompt, item: Deliverable, result: tuple[str, bool] | None
    ) -> ModelReply:
        output = result[0] if result else ""
        found = _REMAINING.search(output)
        if result is None or result[1] or found is None:
            snippet = output.strip()[-400:] or "no output"
            return ModelReply.text(
                f"The commit step for {prompt.story_id} failed ({snippet}). "
                "The story is not finished; the next iteration should retry it."
            )
        remaining = int(found.group(1))
        text = (
            f"Finished {prompt.story_id}: wrote {item.path}, marked the story as passing in "
            f"{prompt.prd_file}, logged it in the progress file and committed."
        )
        if remaining:
            return ModelReply.text(f"{text} {remaining} stories still to do.")
        return ModelReply.text(f"{text} Every story passes now.\n\n{COMPLETE_MARKER}")


class EchoCompleteModel(ScriptedModel):
    """Quotes the prompt back, completion marker included, and does no work."""

    name = "echo-complete"

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        messages = body.get("messages")
        prompt = find_ralph_prompt(messages) if isinstance(messages, list) else None
        if prompt is None or not body.get("tools"):
            return _side_answer(body)
        return ModelReply.text(f"You asked me the following:\n\n{prompt.text}")


class NoProgressModel(ScriptedModel):
    """Answers every turn with text and changes nothing."""

    name = "no-progress"

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        if not body.get("tools"):
            return _side_answer(body)
        return ModelReply.text("I looked at the task and decided to change nothing this time.")


class SlowModel(ScriptedModel):
    """Waits ``delay`` seconds before each of ``inner``'s replies (default :class:`DemoModel`)."""

    name = "slow"

    def __init__(self, delay: float, inner: ScriptedModel | None = None) -> None:
        self.delay = delay
        self.inner = inner if inner is not None else DemoModel()

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        return self.inner.decide(body)

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        await asyncio.sleep(self.delay)
        return await self.inner.reply(body)
