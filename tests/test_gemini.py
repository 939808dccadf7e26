"""Gemini translation: schema cleaning, request mapping, thought signatures, and the anthropic
SDK through the proxy against a scripted mock Gemini server."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import pytest

import ccproxy
from helpers import answer_of, CLAUDE_CODE_VERSIONS, json_reply, Reply, sdk, stream_reply

GEMINI_KEY = "AIzaSy-gemini-secret-0123456789"


# --- an independent check of what Gemini's Schema accepts ---------------------------------------

ALLOWED_KEYS = {"type", "format", "description", "title", "nullable", "enum", "properties",
                "required", "items", "anyOf", "minimum", "maximum", "minItems", "maxItems",
                "minLength", "maxLength", "minProperties", "maxProperties", "pattern", "example",
                "propertyOrdering"}
TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"}


def assert_gemini_schema(node, path="parameters"):
    """Fails with the path of the first thing Gemini's OpenAPI subset would reject."""
    assert isinstance(node, dict), path
    assert set(node) <= ALLOWED_KEYS, (path, set(node) - ALLOWED_KEYS)
    if "anyOf" in node:
        assert set(node) <= {"anyOf", "description", "nullable"}, path
        for i, option in enumerate(node["anyOf"]):
            assert_gemini_schema(option, "%s.anyOf[%d]" % (path, i))
        return
    assert node.get("type") in TYPES, (path, node.get("type"))
    if "enum" in node:
        assert node["enum"] and all(isinstance(v, str) and v for v in node["enum"]), path
    if "format" in node:
        assert node["format"] in {"enum", "date-time", "float", "double", "int32", "int64"}, path
    if "properties" in node or "required" in node:
        assert node["type"] == "OBJECT", path
        assert set(node.get("required", ())) <= set(node.get("properties", ())), path
        for name, value in node.get("properties", {}).items():
            assert_gemini_schema(value, "%s.%s" % (path, name))
    if node["type"] == "ARRAY":
        assert_gemini_schema(node["items"], path + ".items")
    else:
        assert "items" not in node, path


def test_rule_book_schema_example_is_cleaned_exactly():
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "additionalProperties": False,
              "properties": {"path": {"type": "string", "format": "uri", "default": "a.txt"},
                             "n": {"type": ["integer", "null"], "exclusiveMinimum": 0}},
              "required": ["path", "ghost"]}
    assert ccproxy.gemini_schema(schema, {}) == {
        "type": "OBJECT", "properties": {"path": {"type": "STRING"},
                                         "n": {"type": "INTEGER", "nullable": True}},
        "required": ["path"]}


@pytest.mark.parametrize("schema, expected", [
    ({"const": "x"}, {"type": "STRING", "enum": ["x"]}),
    ({"const": 1}, {"type": "INTEGER"}),                 # a typeless const or enum: its values'
    ({"enum": [True, False]}, {"type": "BOOLEAN"}),      # type, which Gemini's enum (strings
    ({"enum": [1, 2.5]}, {"type": "NUMBER"}),            # only) cannot say
    ({"enum": [1, "a"]}, {"type": "STRING"}),
    ({"type": "string", "enum": ["a", "", "b"]}, {"type": "STRING", "enum": ["a", "b"]}),
    ({"type": "integer", "enum": [1, 2]}, {"type": "INTEGER"}),
    ({"type": "array"}, {"type": "ARRAY", "items": {"type": "STRING"}}),
    ({"type": "array", "items": {}}, {"type": "ARRAY", "items": {"type": "STRING"}}),
    ({"properties": {"a": {"type": "boolean"}}},
     {"type": "OBJECT", "properties": {"a": {"type": "BOOLEAN"}}}),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     {"type": "OBJECT", "description": "JSON object"}),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "description": "d"},
     {"type": "STRING", "nullable": True, "description": "d"}),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}], "default": 1},
     {"anyOf": [{"type": "STRING"}, {"type": "INTEGER"}]}),
    ({"type": ["string", "integer"]}, {"anyOf": [{"type": "STRING"}, {"type": "INTEGER"}]}),
    ({"description": "any JSON value"}, {"description": "any JSON value", "anyOf": [
        {"type": "STRING"}, {"type": "NUMBER"}, {"type": "BOOLEAN"},
        {"type": "OBJECT", "description": "JSON object"},
        {"type": "ARRAY", "items": {"type": "STRING"}}]}),
    ({"type": "string", "format": "date-time", "examples": ["2026-01-01T00:00:00Z"]},
     {"type": "STRING", "format": "date-time", "example": "2026-01-01T00:00:00Z"}),
    ({"type": "number", "format": "double", "multipleOf": 2, "minimum": 0},
     {"type": "NUMBER", "format": "double", "minimum": 0}),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "string"}}}]},
     {"type": "OBJECT", "properties": {"a": {"type": "STRING"}, "b": {"type": "STRING"}},
      "required": ["a"]}),
])
def test_schema_cleaning_rules(schema, expected):
    assert ccproxy.gemini_schema(schema, {}) == expected


def test_refs_are_inlined_and_recursion_is_capped():
    schema = {"type": "object", "$defs": {"Node": {"type": "object", "properties": {
        "name": {"type": "string"}, "child": {"$ref": "#/$defs/Node"}}}},
              "properties": {"root": {"$ref": "#/$defs/Node"}}}
    declaration = ccproxy.gemini_function_declaration({"name": "tree", "input_schema": schema})
    assert_gemini_schema(declaration["parameters"])
    root = declaration["parameters"]["properties"]["root"]
    assert root["properties"]["name"] == {"type": "STRING"}
    assert root["properties"]["child"]["type"] == "OBJECT"


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_every_claude_code_tool_schema_comes_out_valid_for_gemini(claude_code_requests, version):
    tools = claude_code_requests[version][0]["json"]["tools"]
    assert len(tools) > 10
    for tool in tools:
        declaration = ccproxy.gemini_function_declaration(tool)
        assert ccproxy.GEMINI_TOOL_NAME_RE.match(declaration["name"])
        if "parameters" in declaration:
            assert_gemini_schema(declaration["parameters"], tool["name"])
        else:
            assert not tool["input_schema"].get("properties"), tool["name"]


# --- request mapping ----------------------------------------------------------------------

def gemini_provider(**extra):
    entry = dict({"name": "gemini", "api_key": GEMINI_KEY}, **extra)
    return ccproxy.build_config({"providers": [entry]}, "c", {}).providers[0]


def mapped(body, model="gemini-2.5-pro", **extra):
    body = dict({"model": "claude-x", "max_tokens": 100}, **body)
    return ccproxy.gemini_request_from_anthropic(body, gemini_provider(**extra), model)


def test_conversation_maps_to_the_exact_generate_content_body():
    body = {
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cch=1;"},
                   {"type": "text", "text": "Be terse."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Rome and Oslo?"},
                                         {"type": "image", "source": {"type": "base64",
                                                                      "media_type": "image/png",
                                                                      "data": "iVBO"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "cold"}]},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny", "is_error": False},
                {"type": "text", "text": "Thanks"}]},
            {"role": "system", "content": "Answer in English."},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [{"name": "get_weather", "description": "Weather",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"], "additionalProperties": False}}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "temperature": 0.3, "top_p": 0.8, "top_k": 20, "stop_sequences": ["END"],
        "metadata": {"user_id": "u"}, "context_management": {},
    }
    assert mapped(body) == {
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Rome and Oslo?"},
                                       {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}]},
            {"role": "model", "parts": [
                {"text": "Checking."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}},
                 "thoughtSignature": "skip_thought_signature_validator"},
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
                {"functionResponse": {"name": "get_weather", "response": {"output": "cold"}}},
                {"text": "Thanks"}, {"text": "And tomorrow?"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be terse.\n\nAnswer in English."}]},
        "tools": [{"functionDeclarations": [{
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}},
                           "required": ["city"]}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY",
                                                 "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {"maxOutputTokens": 100, "temperature": 0.3, "topP": 0.8, "topK": 20,
                             "stopSequences": ["END"]},
    }


def test_errors_missing_results_and_orphans():
    contents = mapped({"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "b", "name": "g", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": "boom", "is_error": True},
            {"type": "tool_result", "tool_use_id": "zzz", "content": "late"}]}]})["contents"]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "f", "response": {"error": "boom"}}},
        {"functionResponse": {"name": "g", "response": {"error": ccproxy.INTERRUPTED_CALL_RESULT}}},
        {"text": "[tool result zzz]\nlate"}]


@pytest.mark.parametrize("choice, config", [
    ({"type": "auto"}, {"mode": "AUTO"}), ({"type": "any"}, {"mode": "ANY"}),
    ({"type": "none"}, {"mode": "NONE"})])
def test_tool_choice(choice, config):
    request = mapped({"messages": [{"role": "user", "content": "x"}], "tool_choice": choice,
                      "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    assert request["toolConfig"] == {"functionCallingConfig": config}
    assert request["tools"] == [{"functionDeclarations": [{"name": "f"}]}]


def test_web_search_becomes_google_search_beside_any_functions():
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}
    alone = mapped({"messages": [{"role": "user", "content": "x"}], "tools": [search],
                    "tool_choice": {"type": "tool", "name": "web_search"}})
    assert alone["tools"] == [{"googleSearch": {}}] and "toolConfig" not in alone
    with_functions = mapped({"messages": [{"role": "user", "content": "x"}],
                             "tools": [search, {"name": "f", "input_schema": {"type": "object"}}],
                             "tool_choice": {"type": "tool", "name": "web_search"}})
    assert with_functions["tools"] == [{"functionDeclarations": [{"name": "f"}]},
                                       {"googleSearch": {}}]
    assert "toolConfig" not in with_functions     # never force a function it was not given


@pytest.mark.parametrize("model, thinking, expected", [
    ("gemini-2.5-pro", {"type": "enabled", "budget_tokens": 2048},
     {"thinkingBudget": 2048, "includeThoughts": True}),
    ("gemini-2.5-flash", {"type": "adaptive"}, {"thinkingBudget": -1, "includeThoughts": True}),
    ("gemini-3-pro-preview", {"type": "enabled", "budget_tokens": 1024},
     {"thinkingLevel": "low", "includeThoughts": True}),
    ("gemini-3-pro-preview", {"type": "enabled", "budget_tokens": 20000},
     {"thinkingLevel": "high", "includeThoughts": True}),
    ("gemini-2.5-pro", None, None),                  # not asked: the model decides
    # turned off (Claude Code's side requests, with a few dozen output tokens): the least
    ("gemini-2.5-pro", {"type": "disabled"}, {"thinkingBudget": 128}),     # Pro cannot stop
    ("gemini-2.5-flash", {"type": "disabled"}, {"thinkingBudget": 0}),
    ("gemini-2.5-flash-lite", {"type": "disabled"}, {"thinkingBudget": 0}),
    ("gemini-3-pro-preview", {"type": "disabled"}, {"thinkingLevel": "low"}),
    ("gemini-3-flash", {"type": "disabled"}, {"thinkingLevel": "low"})])
def test_thinking_config(model, thinking, expected):
    body = {"messages": [{"role": "user", "content": "x"}]}
    if thinking:
        body["thinking"] = thinking
    config = mapped(body, model=model)["generationConfig"]
    assert config.get("thinkingConfig") == expected


@pytest.mark.parametrize("model, effort, expected", [
    ("gemini-3-pro-preview", "medium", {"thinkingLevel": "low"}),   # Pro: low and high only
    ("gemini-3-pro-preview", "xhigh", {"thinkingLevel": "high"}),
    ("gemini-3-flash", "medium", {"thinkingLevel": "medium"}),
    ("gemini-2.5-pro", "low", {"thinkingBudget": 1024}),
    ("gemini-2.5-flash", "max", {"thinkingBudget": 24576}),
])
def test_effort_maps_to_thinking_level_or_budget(model, effort, expected):
    config = mapped({"messages": [{"role": "user", "content": "x"}],
                     "thinking": {"type": "adaptive"}, "output_config": {"effort": effort}},
                    model=model)["generationConfig"]
    assert config["thinkingConfig"] == dict(expected, includeThoughts=True)


TITLE_SCHEMA = {"type": "object", "properties": {"title": {"type": ["string", "null"]}},
                "required": ["title"], "additionalProperties": False}


def test_a_json_schema_output_format_is_json_output_with_a_response_schema():
    """Claude Code asks for its session titles (and `claude -p --json-schema` for the answer)
    as JSON of a schema: Gemini gets JSON output and the schema in its own subset."""
    config = mapped({"messages": [{"role": "user", "content": "x"}], "output_config": {
        "format": {"type": "json_schema", "schema": TITLE_SCHEMA}}})["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {
        "type": "OBJECT", "properties": {"title": {"type": "STRING", "nullable": True}},
        "required": ["title"]}
    assert "responseSchema" not in mapped({"messages": [{"role": "user", "content": "x"}]})[
        "generationConfig"]


def test_an_output_schema_nested_too_deeply_is_a_400_naming_it():
    schema = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ccproxy.InvalidRequestError, match="output_config.format: the schema "
                                                          "nests too deeply"):
        mapped({"messages": [{"role": "user", "content": "x"}],
                "output_config": {"format": {"type": "json_schema", "schema": schema}}})


def test_url_images_are_refused_with_a_reason():
    with pytest.raises(ccproxy.InvalidRequestError, match=r"messages\[0\].content\[0\].*inline"):
        mapped({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]})


def test_endpoint_urls_and_key_header():
    provider = gemini_provider()
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    body = {"model": "x", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    url, headers, _ = ccproxy.PROTOCOLS["gemini"].messages_request(
        provider, "models/gemini-2.5-pro", request, body)
    assert url == ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-pro"
                   ":streamGenerateContent?alt=sse")
    assert headers["x-goog-api-key"] == GEMINI_KEY and GEMINI_KEY not in url


def test_long_and_odd_tool_names_are_mapped_and_mapped_back():
    name = "mcp__my-server__" + "a" * 70
    mapped_name = ccproxy.gemini_tool_name(name)
    assert ccproxy.GEMINI_TOOL_NAME_RE.match(mapped_name)
    assert ccproxy.gemini_tool_name("9lives") != "9lives"


# --- through the proxy, with the anthropic SDK as the client -------------------------------------

@pytest.fixture
def gemini_proxy(start_proxy, upstream):
    return start_proxy({"providers": [{"name": "gemini", "api_base_url": upstream.url + "/v1beta",
                                       "api_key": GEMINI_KEY, "models": ["gemini-2.5-pro"]}]})


REQUEST = dict(model="claude-test-model", max_tokens=300,
               messages=[{"role": "user", "content": "Weather in Rome?"}],
               tools=[{"name": "get_weather", "description": "Weather",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                      {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}])

USAGE = {"promptTokenCount": 1200, "cachedContentTokenCount": 1000, "candidatesTokenCount": 40,
         "thoughtsTokenCount": 60, "totalTokenCount": 1300}


def answer(parts, finish="STOP", usage=USAGE):
    body = {"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
            "usageMetadata": usage, "modelVersion": "gemini-2.5-pro"}
    if finish:
        body["candidates"][0]["finishReason"] = finish
    return body


def gemini_stream(chunks):
    return [b"data: %s\r\n\r\n" % json.dumps(c).encode() for c in chunks]


@pytest.mark.parametrize("depth", [480, 700])
def test_a_tool_schema_nested_hundreds_deep_is_translated_or_a_400_never_a_500(
        gemini_proxy, upstream, depth):
    """Hundreds of levels (no real schema has them): translated where this Python's recursion
    reaches that deep, else a 400 naming the tool, or, where even reading the request would go
    too deep, a 400 saying so; never a 500."""
    upstream.script = lambda r: json_reply(answer([{"text": "ok"}], "STOP"))
    schema = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' \
        + "}}" * depth
    body = json.dumps(dict(REQUEST, tools=[{"name": "deep", "input_schema": "SCHEMA"}]))
    request = urllib.request.Request(gemini_proxy.url + "/v1/messages",
                                     body.replace('"SCHEMA"', schema).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["content"][0]["text"] == "ok"
    except urllib.error.HTTPError as error:
        message = json.loads(error.read())["error"]["message"]
        assert error.code == 400 and upstream.requests == []
        assert "input_schema of 'deep' nests too deeply" in message or "recursion" in message


def test_an_event_stream_answered_to_a_request_for_a_whole_answer_is_read_whole(gemini_proxy,
                                                                               upstream):
    """A gateway in front of Gemini that streams whatever it is asked: the whole answer the
    client asked for is gathered from the events (it had been a 502, "not JSON")."""
    upstream.script = lambda r: Reply(200, pieces=gemini_stream([
        answer([{"text": "Sunny"}], None, None),
        answer([{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}], "STOP")]),
        content_type="text/event-stream")
    message = sdk(gemini_proxy).messages.create(**REQUEST)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"city": "Rome"} and message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 100                       # candidates and thoughts


@pytest.mark.parametrize("stream", [False, True])
def test_numbers_json_cannot_hold_reach_the_client_as_null(gemini_proxy, upstream, stream):
    """NaN, Infinity and 1e999 (a provider's Python JSON writer makes the first two) arrive as
    JavaScript writes them, null, so the client (Claude Code is JavaScript) can read the answer."""
    body = json.dumps(answer([{"functionCall": {"name": "get_weather", "args": {
        "city": "Rome", "nan": float("nan"), "big": float("inf")}}}], "STOP"))
    body = body.replace('"big": Infinity', '"big": Infinity, "huge": 1e999')
    upstream.script = lambda r: (Reply(200, pieces=[b"data: %s\r\n\r\n" % body.encode()],
                                       content_type="text/event-stream") if stream
                                 else Reply(200, body.encode()))
    with urllib.request.urlopen(urllib.request.Request(
            gemini_proxy.url + "/v1/messages", json.dumps(dict(REQUEST, stream=stream)).encode(),
            {"content-type": "application/json"}), timeout=10) as response:
        text = response.read().decode().replace('\\"', '"')    # a stream's tool input is a string
    assert "NaN" not in text and "Infinity" not in text
    assert '"nan": null' in text and '"huge": null' in text


SCENARIOS = {
    "text": ([answer([{"text": "Hel"}], None, None), answer([{"text": "lo ☀️ 東京"}], "STOP")],
             [{"type": "text", "text": "Hello ☀️ 東京"}], "end_turn"),
    "one_tool": ([answer([{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}},
                           "thoughtSignature": "SIG1"}])],
                 [{"type": "thinking", "thinking": "", "signature": "ccpx1.gemini.SIG1"},
                  {"type": "tool_use", "id": "*", "name": "get_weather", "input": {"city": "Rome"}}],
                 "tool_use"),
    "several_tools": ([answer([{"text": "Both."}], None, None), answer([
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
        {"functionCall": {"name": "get_time", "args": {}}}])],
        [{"type": "text", "text": "Both."},
         {"type": "tool_use", "id": "*", "name": "get_weather", "input": {"city": "Rome"}},
         {"type": "tool_use", "id": "*", "name": "get_time", "input": {}}], "tool_use"),
    "thinking": ([answer([{"text": "Let me think.", "thought": True}], None, None),
                  answer([{"text": "Sunny."}])],
                 [{"type": "thinking", "thinking": "Let me think.", "signature": "ccpx1.gemini"},
                  {"type": "text", "text": "Sunny."}], "end_turn"),
    "max_tokens": ([answer([{"text": "Trunc"}], "MAX_TOKENS")], [{"type": "text", "text": "Trunc"}],
                   "max_tokens"),
    "safety": ([answer([], "SAFETY")],
               [{"type": "text", "text": "[Gemini stopped the answer: SAFETY]"}], "refusal"),
    "blocked_prompt": ([{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                         "usageMetadata": {"promptTokenCount": 5}}],
                       [{"type": "text", "text": "[Gemini blocked the prompt: PROHIBITED_CONTENT]"}],
                       "refusal"),
    "malformed_call": ([answer([], "MALFORMED_FUNCTION_CALL")],
                       [{"type": "text", "text": "[Gemini could not produce a valid tool call: "
                                                 "MALFORMED_FUNCTION_CALL]"}], "end_turn"),
}


def blocks_of(message):
    blocks = [b.model_dump(exclude_none=True, exclude={"citations", "caller"}) for b in message.content]
    for block in blocks:
        if block["type"] == "tool_use":
            assert block["id"].startswith("toolu_")
            block["id"] = "*"
    return blocks


def whole_answer(chunks):
    """The non-stream answer equivalent to a list of stream chunks."""
    parts = [p for c in chunks for cand in c.get("candidates", ()) for p in cand["content"]["parts"]]
    merged = dict(chunks[-1])
    if "candidates" in merged:
        merged["candidates"] = [dict(merged["candidates"][0], content={"role": "model", "parts": parts})]
    return merged


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sdk_scenarios(gemini_proxy, upstream, name, stream):
    chunks, expected, stop_reason = SCENARIOS[name]
    if stream:
        upstream.script = lambda r: stream_reply(gemini_stream(chunks))
        with sdk(gemini_proxy).messages.stream(**REQUEST) as s:
            message = s.get_final_message()
    else:
        upstream.script = lambda r: json_reply(whole_answer(chunks))
        message = sdk(gemini_proxy).messages.create(**REQUEST)
    assert blocks_of(message) == expected
    assert message.stop_reason == stop_reason
    sent = upstream.requests[0]
    action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
    assert sent["path"] == "/v1beta/models/gemini-2.5-pro" + action
    assert sent["headers"]["x-goog-api-key"] == GEMINI_KEY


@pytest.mark.parametrize("stream", [True, False])
def test_stop_sequences_past_the_five_gemini_takes_are_kept_by_ccproxy(gemini_proxy, upstream,
                                                                       stream):
    stops = ["S1", "S2", "S3", "S4", "S5", "S6"]
    chunks = [answer([{"text": "one two S"}], None), answer([{"text": "6 three"}], "STOP")]
    upstream.script = lambda r: stream_reply(gemini_stream(chunks)) if stream \
        else json_reply(answer([{"text": "one two S6 three"}], "STOP"))
    message = answer_of(sdk(gemini_proxy), stream, **dict(REQUEST, stop_sequences=stops))
    assert upstream.requests[0]["json"]["generationConfig"]["stopSequences"] == stops[:5]
    assert (blocks_of(message), message.stop_reason, message.stop_sequence) == (
        [{"type": "text", "text": "one two "}], "stop_sequence", "S6")


def test_sdk_usage_counts_cache_and_thoughts(gemini_proxy, upstream):
    upstream.script = lambda r: json_reply(answer([{"text": "x"}]))
    usage = sdk(gemini_proxy).messages.create(**REQUEST).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (200, 1000, 100)


@pytest.mark.parametrize("stream", [True, False])
def test_thought_signature_survives_a_two_turn_tool_conversation(gemini_proxy, upstream, stream):
    first = answer([{"text": "Planning", "thought": True},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}},
                     "thoughtSignature": "Q2lnbmF0dXJlMQ=="},
                    {"functionCall": {"name": "get_time", "args": {}}}])
    replies = [first, answer([{"text": "Sunny at noon."}])]
    upstream.script = lambda r: (stream_reply(gemini_stream([replies.pop(0)])) if stream
                                 else json_reply(replies.pop(0)))
    client = sdk(gemini_proxy)

    def ask(messages):
        if stream:
            with client.messages.stream(**dict(REQUEST, messages=messages)) as s:
                return s.get_final_message()
        return client.messages.create(**dict(REQUEST, messages=messages))

    turn = ask(REQUEST["messages"])
    calls = [b for b in turn.content if b.type == "tool_use"]
    history = REQUEST["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in turn.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"},
                                     {"type": "tool_result", "tool_use_id": calls[1].id, "content": "noon"}]}]
    assert ask(history).content[0].text == "Sunny at noon."
    model_turn = upstream.requests[1]["json"]["contents"][1]
    assert model_turn["role"] == "model"
    assert model_turn["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}},
         "thoughtSignature": "Q2lnbmF0dXJlMQ=="},
        {"functionCall": {"name": "get_time", "args": {}}}]
    assert upstream.requests[1]["json"]["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
        {"functionResponse": {"name": "get_time", "response": {"output": "noon"}}}]


def test_the_ids_gemini_gives_its_calls_go_back_with_them_and_their_results(gemini_proxy,
                                                                            upstream):
    """Gemini's Developer API names each call (it "must be sent back in the associated
    FunctionResponse"); two calls of one tool are told apart by it, not by their order."""
    first = answer([{"functionCall": {"name": "get_weather", "args": {"city": c}, "id": i}}
                    for c, i in (("Rome", "call_41"), ("Oslo", "call_42"))])
    replies = [first, answer([{"text": "Warm and cold."}])]
    upstream.script = lambda r: json_reply(replies.pop(0))
    client = sdk(gemini_proxy)
    turn = client.messages.create(**REQUEST)
    calls = [b for b in turn.content if b.type == "tool_use"]
    assert [c.id for c in calls] == ["gemini_call_41", "gemini_call_42"]
    history = REQUEST["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in turn.content]
         + [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": calls[1].id, "content": "cold"},
            {"type": "tool_result", "tool_use_id": calls[0].id, "content": "warm"},
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "?"}]}]
    client.messages.create(**dict(REQUEST, messages=history))
    model_turn, results = upstream.requests[1]["json"]["contents"][1:3]
    assert [p["functionCall"].get("id") for p in model_turn["parts"]] == [
        "call_41", "call_42", None]
    assert [(p["functionResponse"].get("id"), p["functionResponse"]["response"])
            for p in results["parts"]] == [("call_41", {"output": "warm"}),
                                           ("call_42", {"output": "cold"}), (None, {"output": "?"})]


def test_a_gemini_call_id_repeated_in_a_later_turn_goes_back_as_gemini_gave_it(gemini_proxy,
                                                                            upstream):
    """Claude Code gets an id of its own for a call whose id an earlier call had; Gemini gets
    its own id back, with the call and with its result."""
    upstream.script = lambda r: json_reply(answer([{"functionCall": {
        "name": "get_time", "args": {}, "id": "call_1"}}]))
    client = sdk(gemini_proxy)
    first = client.messages.create(**REQUEST).content[0].id
    history = REQUEST["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": first, "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first,
                                      "content": "noon"}]}]
    second = client.messages.create(**dict(REQUEST, messages=history)).content[0].id
    assert first == "gemini_call_1" and second.startswith("ccpxre_")
    upstream.script = lambda r: json_reply(answer([{"text": "Noon twice."}]))
    client.messages.create(**dict(REQUEST, messages=history + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": second, "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": second,
                                      "content": "noon"}]}]))
    parts = [part for content in upstream.requests[-1]["json"]["contents"]
             for part in content["parts"]]
    assert [p["functionCall"]["id"] for p in parts if "functionCall" in p] == ["call_1"] * 2
    assert [p["functionResponse"]["id"] for p in parts if "functionResponse" in p] == \
        ["call_1"] * 2


def google_error(code, status, message, details=()):
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


@pytest.mark.parametrize("http_status, body, error_class, error_type, client_status", [
    (429, google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "32s"}]),
     anthropic.RateLimitError, "rate_limit_error", 429),
    (400, google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                       [{"reason": "API_KEY_INVALID"}]),
     anthropic.AuthenticationError, "authentication_error", 401),
    (400, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload"),
     anthropic.BadRequestError, "invalid_request_error", 400),
    (403, google_error(403, "PERMISSION_DENIED", "denied"), anthropic.PermissionDeniedError,
     "permission_error", 403),
    (404, google_error(404, "NOT_FOUND", "models/x is not found"), anthropic.BadRequestError,
     "invalid_request_error", 400),
    (500, google_error(500, "INTERNAL", "internal"), anthropic.InternalServerError, "api_error", 500),
    (503, google_error(503, "UNAVAILABLE", "The model is overloaded."), anthropic.APIStatusError,
     "overloaded_error", 529),
    (504, google_error(504, "DEADLINE_EXCEEDED", "deadline"), anthropic.APIStatusError,
     "timeout_error", 504),
])
def test_gemini_errors_are_mapped(gemini_proxy, upstream, http_status, body, error_class,
                                  error_type, client_status):
    upstream.script = lambda r: json_reply(body, http_status)
    with pytest.raises(error_class) as caught:
        sdk(gemini_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == client_status
    assert caught.value.body["error"]["type"] == error_type
    message = caught.value.body["error"]["message"]
    config_problem = http_status in (403, 404) or "API_KEY_INVALID" in json.dumps(body)
    if config_problem:       # named as such, and Claude Code is told not to retry
        assert message.endswith("in test-config.json (gemini: %s)" % body["error"]["message"])
        assert caught.value.response.headers["x-should-retry"] == "false"
    else:
        assert message == "gemini: " + body["error"]["message"]
        assert "x-should-retry" not in caught.value.response.headers
    if http_status == 429:
        assert caught.value.response.headers["retry-after"] == "32"


def test_error_mid_stream_becomes_an_error_event(gemini_proxy, upstream):
    chunks = gemini_stream([answer([{"text": "Hel"}], None, None)]) + gemini_stream(
        [google_error(503, "UNAVAILABLE", "overloaded")])
    upstream.script = lambda r: stream_reply(chunks)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(gemini_proxy).messages.stream(**REQUEST) as s:
            s.get_final_message()
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "gemini: overloaded"}


def test_stream_without_finish_reason_ends_with_an_error_event(gemini_proxy, upstream):
    upstream.script = lambda r: stream_reply(gemini_stream([answer([{"text": "Hel"}], None, None)]))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(gemini_proxy).messages.stream(**REQUEST) as s:
            s.get_final_message()
    assert "ended before completion" in caught.value.body["error"]["message"]


def test_key_never_appears_in_errors_or_urls(gemini_proxy, upstream):
    upstream.script = lambda r: json_reply(google_error(400, "INVALID_ARGUMENT",
                                                        "bad key " + GEMINI_KEY), 400)
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(gemini_proxy).messages.create(**REQUEST)
    assert GEMINI_KEY not in json.dumps(caught.value.body)
    assert GEMINI_KEY not in upstream.requests[0]["path"]


def test_html_error_page_is_mapped(gemini_proxy, upstream):
    upstream.script = lambda r: Reply(502, b"<html><b>Bad Gateway</b></html>", content_type="text/html")
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(gemini_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["message"] == "gemini: HTTP 502: Bad Gateway"


def test_count_tokens_asks_gemini_count_tokens(gemini_proxy, upstream):
    upstream.script = lambda r: json_reply({"totalTokens": 321})
    count = sdk(gemini_proxy).messages.count_tokens(
        model="claude-x", messages=[{"role": "user", "content": "hello"}], system="Be brief.")
    assert count.input_tokens == 321
    sent = upstream.requests[0]
    assert sent["path"] == "/v1beta/models/gemini-2.5-pro:countTokens"
    assert sent["json"]["generateContentRequest"]["model"] == "models/gemini-2.5-pro"
    assert sent["json"]["generateContentRequest"]["contents"] == [
        {"role": "user", "parts": [{"text": "hello"}]}]
    assert sent["headers"]["x-goog-api-key"] == GEMINI_KEY


@pytest.mark.parametrize("max_tokens", [{"n": 1}, "300", 0])
def test_a_count_with_a_max_tokens_that_is_no_count_is_a_400_naming_it(gemini_proxy, upstream,
                                                                       max_tokens):
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: must be a positive integer"):
        sdk(gemini_proxy).messages.count_tokens(
            model="claude-x", messages=[{"role": "user", "content": "hello"}],
            extra_body={"max_tokens": max_tokens})
    assert upstream.requests == []


def test_count_tokens_falls_back_when_gemini_fails(gemini_proxy, upstream):
    upstream.script = lambda r: json_reply(google_error(400, "INVALID_ARGUMENT", "nope"), 400)
    count = sdk(gemini_proxy).messages.count_tokens(
        model="claude-x", messages=[{"role": "user", "content": "hello there, how are you?"}])
    assert 5 <= count.input_tokens <= 20


# --- web search: Google Search grounding as Anthropic's search blocks ---------------------------

SEARCH_REQUEST = dict(model="claude-test-model", max_tokens=300,
                      system="You are an assistant for performing a web search tool use",
                      messages=[{"role": "user", "content":
                                 "Perform a web search for the query: python 3.14 release"}],
                      tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                      tool_choice={"type": "tool", "name": "web_search"})
FOUND = "Python 3.14 came out in October 2025."
GROUNDING = {"webSearchQueries": ["python 3.14 release date"],
             "groundingChunks": [{"web": {"uri": "https://www.python.org/downloads/3.14/",
                                          "title": "python.org"}},
                                 {"web": {"uri": "https://docs.python.org/3.14/whatsnew/",
                                          "title": "docs.python.org"}}],
             "groundingSupports": [{"segment": {"startIndex": 0, "endIndex": len(FOUND),
                                                "text": FOUND}, "groundingChunkIndices": [0, 1]}],
             "searchEntryPoint": {"renderedContent": "<div>…</div>"}}


def grounded(chunks_of_text):
    *first, last = chunks_of_text
    chunks = [answer([{"text": text}], None, None) for text in first]
    final = answer([{"text": last}], "STOP")
    final["candidates"][0]["groundingMetadata"] = GROUNDING
    return chunks + [final]


@pytest.mark.parametrize("stream", [False, True])
def test_google_search_grounding_becomes_search_blocks_and_citations(gemini_proxy, upstream,
                                                                     stream):
    chunks = grounded(["Python 3.14 came out", " in October 2025."])
    upstream.script = lambda r: (Reply(200, pieces=gemini_stream(chunks),
                                       content_type="text/event-stream") if stream
                                 else json_reply(grounded([FOUND])[0]))
    message = answer_of(sdk(gemini_proxy), stream, **SEARCH_REQUEST)
    sent = upstream.requests[0]["json"]
    assert sent["tools"] == [{"googleSearch": {}}] and "toolConfig" not in sent
    text, use, result = message.content
    assert (text.type, use.type, result.type) == ("text", "server_tool_use",
                                                   "web_search_tool_result")
    assert text.text == FOUND and message.stop_reason == "end_turn"
    assert [(c.url, c.cited_text) for c in text.citations] == [
        ("https://www.python.org/downloads/3.14/", FOUND),
        ("https://docs.python.org/3.14/whatsnew/", FOUND)]
    assert use.name == "web_search" and use.input == {"query": "python 3.14 release date"}
    assert result.tool_use_id == use.id
    assert [(r.url, r.title) for r in result.content] == [
        ("https://www.python.org/downloads/3.14/", "python.org"),
        ("https://docs.python.org/3.14/whatsnew/", "docs.python.org")]


def test_a_function_call_marked_as_thought_is_still_a_call(gemini_proxy, upstream):
    upstream.script = lambda r: json_reply(answer([
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}, "thought": True}]))
    message = sdk(gemini_proxy).messages.create(**REQUEST)
    assert [(b.type, getattr(b, "name", None)) for b in message.content] == [
        ("tool_use", "get_weather")]
    assert message.stop_reason == "tool_use"


def test_thought_tokens_are_reported_as_thinking_tokens():
    usage = ccproxy.anthropic_usage_from_gemini(USAGE)
    assert usage["output_tokens"] == 100 and usage["output_tokens_details"] == {
        "thinking_tokens": 60}
