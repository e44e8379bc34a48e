"""Tenant argument pinning: a tool argument such as ``tenant_id`` always carries the bound tenant.

The argument disappears from every tool's input schema in ``tools/list`` (and every prompt's arguments in
``prompts/list``), so a model never sees it; on ``tools/call`` (and ``prompts/get``, whose arguments fill
a prompt, and among a completion's context arguments) the guard sets it to the credential's tenant. A
client value that differs is refused, wherever it hides: another spelling of the key, another case, or
deeper in the arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.errors import InvalidRequest, TenantMismatch
from mcpguard.request_state import state_of

__all__ = ["PinningLayer", "strip_pinned_argument", "strip_pinned_prompt_argument"]


def strip_pinned_argument(tool: dict[str, Any], argument: str) -> None:
    """Remove ``argument`` from the tool's input schema wherever it is named, in place: every ``properties`` and
    ``required`` at any depth (under ``$defs``, ``allOf``, ``oneOf``, ``if``/``then`` as much as at the top), and
    ``dependentRequired`` / ``dependentSchemas``."""
    stack: list[Any] = [tool.get("inputSchema")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key in ("properties", "dependentRequired", "dependentSchemas"):
            named = node.get(key)
            if isinstance(named, dict):
                named.pop(argument, None)
        required = node.get("required")
        if isinstance(required, list) and argument in required:
            node["required"] = [name for name in required if name != argument]
        dependent = node.get("dependentRequired")
        if isinstance(dependent, dict):
            for key, names in dependent.items():
                if isinstance(names, list) and argument in names:
                    dependent[key] = [name for name in names if name != argument]
        stack.extend(node.values())


def _names(entry: Any, argument: str) -> bool:
    """Whether ``entry`` (a prompt's argument, a completion's) is named ``argument``, in any case."""
    return isinstance(entry, Mapping) and str(entry.get("name", "")).casefold() == argument.casefold()


def strip_pinned_prompt_argument(prompt: Any, argument: str) -> None:
    """Remove ``argument`` (in any case) from a ``prompts/list`` entry's arguments, in place."""
    arguments = prompt.get("arguments") if isinstance(prompt, dict) else None
    if isinstance(arguments, list):
        prompt["arguments"] = [entry for entry in arguments if not _names(entry, argument)]


def _conflicts(value: Any, argument: str, tenant: str) -> bool:
    """Whether any key spelled like ``argument`` (any case, any depth) holds something but ``tenant``."""
    folded = argument.casefold()
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key.casefold() == folded and child != tenant:
                    return True
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return False


# The methods whose arguments a server fills a template or runs a tool with (a prompt is pinned as a tool is),
# and completion, which a server answers from the arguments already given.
_PINNED_METHODS = frozenset({"tools/call", "prompts/get", "completion/complete"})


class PinningLayer:
    """Sets the pinned argument of every ``tools/call``, ``prompts/get`` and completion context to the bound tenant,
    refusing any other value, and refuses to complete the pinned argument itself."""

    name = "pinning"

    def __init__(self, app: ASGIApp, *, argument: str) -> None:
        self.app = app
        self._argument = argument

    def _pinned(self, arguments: Any, method: str, tenant: str) -> dict[str, Any]:
        if not isinstance(arguments, Mapping):
            raise InvalidRequest(f"{method} arguments must be an object")
        if _conflicts(arguments, self._argument, tenant):
            raise TenantMismatch(f"the {self._argument!r} argument names another tenant")
        return {**arguments, self._argument: tenant}

    def _pin_completion(self, params: dict[str, Any], tenant: str) -> None:
        if _names(params.get("argument"), self._argument):
            # Completing it would list tenants that share the caller's prefix; its one value is the caller's own.
            raise TenantMismatch(f"the {self._argument!r} argument is set by the guard and is not completed")
        # The arguments already given, which a server completes from: always the caller's tenant among them.
        context = params.setdefault("context", {})
        if not isinstance(context, dict):
            raise InvalidRequest("completion/complete context must be an object")
        context["arguments"] = self._pinned(context.get("arguments", {}), "completion/complete context", tenant)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        message, principal = state.message, state.principal
        if message is None or message.method not in _PINNED_METHODS or principal is None or state.body is None:
            await self.app(scope, receive, send)
            return
        document = json.loads(state.body)
        params = document.get("params")
        if not isinstance(params, dict):
            raise InvalidRequest(f"{message.method} params must be an object")
        if message.method == "completion/complete":
            self._pin_completion(params, principal.tenant)
        else:
            params["arguments"] = self._pinned(params.get("arguments", {}), message.method, principal.tenant)
        # Re-serialised once, here; the parse layer hands the app whatever state.body holds.
        try:
            state.body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate escape: valid JSON, but no text a server can read
            raise InvalidRequest("the request holds a string that is not valid Unicode") from None
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(state.body)).encode()))
        scope["headers"] = headers
        await self.app(scope, receive, send)
