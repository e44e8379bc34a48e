"""An "everything" MCP server with the fixtures the conformance suite's server scenarios call.

Its reference implementation is not published on npm, so this one is written from the suite's
requirements: ``test_*`` tools and prompts, ``test://`` resources. Run it with
``python -m tests.sidecar.conformance_server HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import uvicorn
from mcp import types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

Ctx = ServerRequestContext[Any, Any]

# A 1x1 red PNG and a WAV of one silent 16-bit sample at 8 kHz.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )
).decode()
WAV = base64.b64encode(
    b"RIFF\x26\x00\x00\x00WAVEfmt \x10\x00\x00\x00"
    + bytes.fromhex("01000100401f0000803e000002001000")
    + b"data\x02\x00\x00\x00\x00\x00"
).decode()
STEP_SECONDS = 0.05


def _object(properties: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties or {}), **extra}


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _embedded(uri: str, mime_type: str, text: str) -> types.EmbeddedResource:
    resource = types.TextResourceContents(uri=uri, mime_type=mime_type, text=text)
    return types.EmbeddedResource(type="resource", resource=resource)


IMAGE = types.ImageContent(type="image", data=PNG, mime_type="image/png")
STATIC_RESULTS: dict[str, list[types.ContentBlock]] = {
    "test_simple_text": [_text("This is a simple text response for testing.")],
    "test_image_content": [IMAGE],
    "test_audio_content": [types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")],
    "test_embedded_resource": [
        _embedded("test://embedded-resource", "text/plain", "This is an embedded resource content.")
    ],
    "test_multiple_content_types": [
        _text("Multiple content types test:"),
        IMAGE,
        _embedded("test://mixed-content-resource", "application/json", '{"test":"data","value":123}'),
    ],
}
ELICITATIONS = {
    "test_elicitation": _object(
        {"username": {"type": "string"}, "email": {"type": "string"}}, required=["username", "email"]
    ),
    "test_elicitation_sep1034_defaults": _object(
        {
            "name": {"type": "string", "default": "John Doe"},
            "age": {"type": "integer", "default": 30},
            "score": {"type": "number", "default": 95.5},
            "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
            "verified": {"type": "boolean", "default": True},
        }
    ),
    "test_elicitation_sep1330_enums": _object(
        {
            "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
            "titledSingle": {"type": "string", "oneOf": [{"const": "value1", "title": "First Option"}]},
            "legacyEnum": {"type": "string", "enum": ["opt1", "opt2"], "enumNames": ["Option One", "Option Two"]},
            "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2"]}},
            "titledMulti": {"type": "array", "items": {"anyOf": [{"const": "value1", "title": "First Choice"}]}},
        }
    ),
}
JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": _object({"street": {"type": "string"}, "city": {"type": "string"}})},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}
TOOLS = [
    *(types.Tool(name=name, description=name, input_schema=_object()) for name in STATIC_RESULTS),
    *(
        types.Tool(name=name, description=name, input_schema=_object())
        for name in ("test_tool_with_logging", "test_tool_with_progress", "test_error_handling", "test_reconnection")
    ),
    types.Tool(
        name="test_sampling",
        description="Asks the client to sample",
        input_schema=_object({"prompt": {"type": "string"}}, required=["prompt"]),
    ),
    types.Tool(
        name="test_elicitation",
        description="Asks the client for input",
        input_schema=_object({"message": {"type": "string"}}, required=["message"]),
    ),
    types.Tool(name="test_elicitation_sep1034_defaults", description="Elicits with defaults", input_schema=_object()),
    types.Tool(name="test_elicitation_sep1330_enums", description="Elicits with enums", input_schema=_object()),
    types.Tool(name="json_schema_2020_12_tool", description="JSON Schema 2020-12", input_schema=JSON_SCHEMA_2020_12),
]


async def _call_tool(ctx: Ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    name, arguments, session = params.name, params.arguments or {}, ctx.session
    if name in STATIC_RESULTS:
        return types.CallToolResult(content=STATIC_RESULTS[name])
    if name == "test_error_handling":
        return types.CallToolResult(content=[_text("This tool intentionally returns an error")], is_error=True)
    if name == "test_tool_with_logging":
        for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
            await session.send_log_message("info", message, "everything", related_request_id=ctx.request_id)
            await asyncio.sleep(STEP_SECONDS)
    elif name == "test_tool_with_progress":
        for progress in (0, 50, 100):
            await session.report_progress(progress, 100)
            await asyncio.sleep(STEP_SECONDS)
    elif name == "test_sampling":
        question = types.SamplingMessage(role="user", content=_text(str(arguments.get("prompt", ""))))
        answer = await session.create_message([question], max_tokens=100, related_request_id=ctx.request_id)
        return types.CallToolResult(content=[_text(f"LLM response: {getattr(answer.content, 'text', '')}")])
    elif name in ELICITATIONS:
        message = str(arguments.get("message", "Please answer"))
        reply = await session.elicit_form(message, ELICITATIONS[name], related_request_id=ctx.request_id)
        return types.CallToolResult(content=[_text(f"action={reply.action}, content={json.dumps(reply.content)}")])
    elif name == "test_reconnection":
        if ctx.close_sse_stream is not None:
            await ctx.close_sse_stream()
        await asyncio.sleep(4 * STEP_SECONDS)
    elif name != "json_schema_2020_12_tool":
        raise ValueError(f"unknown tool {name!r}")
    return types.CallToolResult(content=[_text(f"{name} done")])


RESOURCES = [
    types.Resource(uri="test://static-text", name="Static Text Resource", description="Text", mime_type="text/plain"),
    types.Resource(uri="test://static-binary", name="Static Binary Resource", description="PNG", mime_type="image/png"),
    types.Resource(uri="test://watched-resource", name="Watched Resource", description="Text", mime_type="text/plain"),
]
TEMPLATE = types.ResourceTemplate(
    uri_template="test://template/{id}/data",
    name="Resource Template",
    description="By id",
    mime_type="application/json",
)


async def _read_resource(ctx: Ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
    uri = str(params.uri)
    contents: types.TextResourceContents | types.BlobResourceContents
    if uri == "test://static-binary":
        contents = types.BlobResourceContents(uri=uri, mime_type="image/png", blob=PNG)
    elif uri in ("test://static-text", "test://watched-resource"):
        contents = types.TextResourceContents(uri=uri, mime_type="text/plain", text=f"The content of {uri}.")
    elif match := re.fullmatch(r"test://template/([^/]+)/data", uri):
        text = json.dumps({"id": match[1], "templateTest": True, "data": f"Data for ID: {match[1]}"})
        contents = types.TextResourceContents(uri=uri, mime_type="application/json", text=text)
    else:
        raise ValueError(f"unknown resource {uri!r}")
    return types.ReadResourceResult(contents=[contents])


def _argument(name: str) -> types.PromptArgument:
    return types.PromptArgument(name=name, description=name, required=True)


PROMPTS = [
    types.Prompt(name="test_simple_prompt", description="No arguments"),
    types.Prompt(
        name="test_prompt_with_arguments", description="Two", arguments=[_argument("arg1"), _argument("arg2")]
    ),
    types.Prompt(name="test_prompt_with_embedded_resource", description="One", arguments=[_argument("resourceUri")]),
    types.Prompt(name="test_prompt_with_image", description="An image"),
]


async def _get_prompt(ctx: Ctx, params: types.GetPromptRequestParams) -> types.GetPromptResult:
    arguments = params.arguments or {}
    contents: list[Any]
    if params.name == "test_simple_prompt":
        contents = [_text("This is a simple prompt for testing.")]
    elif params.name == "test_prompt_with_arguments":
        contents = [_text(f"Prompt with arguments: arg1='{arguments.get('arg1')}', arg2='{arguments.get('arg2')}'")]
    elif params.name == "test_prompt_with_embedded_resource":
        uri = arguments.get("resourceUri", "test://example-resource")
        contents = [_embedded(uri, "text/plain", "Embedded resource content."), _text("Please process it.")]
    elif params.name == "test_prompt_with_image":
        contents = [IMAGE, _text("Please analyze the image above.")]
    else:
        raise ValueError(f"unknown prompt {params.name!r}")
    return types.GetPromptResult(messages=[types.PromptMessage(role="user", content=c) for c in contents])


class MemoryEventStore(EventStore):
    """Every event of every stream in order, so a client reconnecting with Last-Event-ID is replayed the rest."""

    def __init__(self) -> None:
        self.events: list[tuple[StreamId, int, types.JSONRPCMessage | None]] = []
        self.ids = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: types.JSONRPCMessage | None) -> EventId:
        event_id = next(self.ids)
        self.events.append((stream_id, event_id, message))
        return str(event_id)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        last = int(last_event_id) if last_event_id.isdigit() else 0
        stream = next((stream for stream, event_id, _ in self.events if event_id == last), None)
        for stream_id, event_id, message in self.events:
            if stream_id == stream and event_id > last and message is not None:
                await send_callback(EventMessage(message, str(event_id)))
        return stream


async def _empty(ctx: Ctx, params: Any) -> types.EmptyResult:
    return types.EmptyResult()


async def _complete(ctx: Ctx, params: types.CompleteRequestParams) -> types.CompleteResult:
    values = [value for value in ("test", "testing", "tested") if value.startswith(params.argument.value)]
    return types.CompleteResult(completion=types.Completion(values=values, total=len(values), has_more=False))


def everything_server() -> Server[Any]:
    """A server with every tool, resource and prompt the suite's server scenarios call."""

    async def tools(ctx: Ctx, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def resources(ctx: Ctx, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=RESOURCES)

    async def templates(ctx: Ctx, params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[TEMPLATE])

    async def prompts(ctx: Ctx, params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=PROMPTS)

    return Server(
        "mcpguard-conformance-everything",
        version="1.0.0",
        on_list_tools=tools,
        on_call_tool=_call_tool,
        on_list_resources=resources,
        on_list_resource_templates=templates,
        on_read_resource=_read_resource,
        on_subscribe_resource=_empty,
        on_unsubscribe_resource=_empty,
        on_list_prompts=prompts,
        on_get_prompt=_get_prompt,
        on_completion=_complete,
        on_set_logging_level=_empty,
    )


if __name__ == "__main__":
    # Logging and sampling are deprecated by a later protocol version, yet the suite still checks them.
    warnings.simplefilter("ignore")
    listen_host, _, listen_port = sys.argv[1].rpartition(":")
    app = everything_server().streamable_http_app(event_store=MemoryEventStore(), retry_interval=100, host=listen_host)
    uvicorn.run(app, host=listen_host, port=int(listen_port), log_level="warning")
