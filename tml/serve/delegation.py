"""Background-model delegation: the model hands a request to an asynchronous worker.

When a served micro-turn's control actions hold ``<delegate>``, the server takes the
**request**: the model's text since its previous ``<delegate>`` (or the session start),
at most :data:`MAX_REQUEST_CHARS` of its end, and starts ``await delegate(request)`` as
an asyncio task; ticks go on meanwhile. The result (a str, cut to
:data:`MAX_RESULT_CHARS`) joins the session's next chunk as its ``background`` input,
which :func:`tml.stream.layout` lays out after ``<bg>`` — so the model reads it in a later
micro-turn. The client sees MODEL_EVENT ``delegated`` (request) and ``background``
(result) frames. A task that fails or exceeds its timeout returns an ``error: ...``
result the same way; closing, rolling back or disconnecting drops pending tasks.

A **delegate** is any ``async (request: str) -> str`` (:data:`Delegate`);
:func:`as_delegate` wraps a plain function. :class:`Router` picks a tool by the
request's first word; the defaults need no network:

* ``clock`` → the current UTC time (ISO 8601);
* ``calc <expression>`` → arithmetic (``+ - * / // % **`` and parentheses over numbers,
  parsed with :mod:`ast`, never ``eval``; exponents ≤ 100);
* ``lookup <words>`` → the first lines of a local text file containing every word
  (case-insensitive), when the router is given ``lookup_file``.

:func:`http_delegate` POSTs the request (``{"request": ...}``) to a URL the user
configures and returns the response's ``"result"`` (or its text).
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import inspect
import operator
from collections.abc import Awaitable, Callable
from pathlib import Path

Delegate = Callable[[str], Awaitable[str]]
MAX_REQUEST_CHARS = 512
MAX_RESULT_CHARS = 512


def as_delegate(fn: Callable[[str], str] | Delegate) -> Delegate:
    """A sync function runs in a worker thread (it may block); an async one is awaited."""
    if inspect.iscoroutinefunction(fn):
        return fn

    async def call(request: str) -> str:
        return await asyncio.to_thread(fn, request)
    return call


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Arithmetic over numbers → its value as text. Raises ValueError on anything else."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 100:
                raise ValueError(f"exponent {b} too large (at most 100)")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"calc takes numbers, + - * / // % ** and parentheses, not {ast.dump(node)[:40]}")
    try:
        value = ev(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"calc {expression!r}: {e}") from None
    return str(value)


class Router:
    """``await Router(lookup_file=..., tools={...}, now=...)(request)``: the tool named by
    the request's first word gets the rest. ``tools`` adds or replaces tools
    (name → function or coroutine function of the rest of the request); ``now`` is the
    clock (a callable returning an aware datetime; for tests)."""

    def __init__(self, lookup_file: str | Path | None = None, tools: dict | None = None, now=None):
        self.now = now or (lambda: dt.datetime.now(dt.UTC))
        self.lookup_file = Path(lookup_file) if lookup_file else None
        self.tools: dict[str, Delegate] = {"clock": as_delegate(lambda _: self.now().isoformat(timespec="seconds")),
                                           "calc": as_delegate(calculate)}
        if self.lookup_file is not None:
            self.tools["lookup"] = as_delegate(self.lookup)
        for name, fn in (tools or {}).items():
            self.tools[name] = as_delegate(fn)

    def lookup(self, words: str, max_lines: int = 3) -> str:
        want = words.lower().split()
        if not want:
            raise ValueError("lookup needs words to look for")
        hits = [line.strip() for line in self.lookup_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and all(w in line.lower() for w in want)]
        return "\n".join(hits[:max_lines]) if hits else f"no line of {self.lookup_file.name} holds {words!r}"

    async def __call__(self, request: str) -> str:
        name, _, rest = request.strip().partition(" ")
        tool = self.tools.get(name.lower())
        if tool is None:
            raise ValueError(f"no tool {name!r}: the request starts with one of {', '.join(sorted(self.tools))}")
        return await tool(rest)


def http_delegate(url: str, timeout_s: float = 10.0) -> Delegate:
    """A delegate that POSTs ``{"request": request}`` to ``url`` → the JSON reply's
    ``"result"``, or the reply's text if it is not JSON."""
    import aiohttp

    async def call(request: str) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http, \
                http.post(url, json={"request": request}) as r:
            r.raise_for_status()
            if r.content_type == "application/json":
                return str((await r.json()).get("result", ""))
            return await r.text()
    return call


async def run_delegate(delegate: Delegate, request: str, timeout_s: float) -> str:
    """The result text, or ``error: ...`` (timeout, exception), cut to MAX_RESULT_CHARS."""
    try:
        result = str(await asyncio.wait_for(delegate(request), timeout_s))
    except TimeoutError:
        result = f"error: no result within {timeout_s:g} s"
    except Exception as e:  # noqa: BLE001 -- a failing tool is a result the model reads, not a server error
        result = f"error: {e}"
    return result[:MAX_RESULT_CHARS]
