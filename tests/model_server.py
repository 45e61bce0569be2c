"""A scripted OpenAI-compatible model on host loopback, for agents that must run offline.

It answers `POST /v1/chat/completions` (what `agents.OpenAIChatCompletionsModel` calls, not streamed):
to a conversation whose last message is the user's, a call of the `sh` tool that appends a line to
`/home/user/notes.txt` and counts its lines; to one whose last message is that tool's result, a final
answer `turn N: <tool output>`, N being the number of user messages in the conversation. `POST /v1/messages` (Anthropic's
Messages API) answers `turn N`. A request without `Authorization: Bearer <key>` (or Anthropic's
`x-api-key: <key>`) is refused with a 401. Every request is recorded
(`requests`: the path, the key's verdict and the messages), so a test can check what the agent sent.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Seen:
    authorized: bool
    authorization: str | None
    messages: list[dict[str, Any]]
    path: str = "/v1/chat/completions"

    def users(self) -> list[str]:
        return [str(m.get("content")) for m in self.messages if m.get("role") == "user"]


@dataclass
class ModelServer:
    key: str
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _httpd: http.server.ThreadingHTTPServer | None = None

    def start(self, tls: ssl.SSLContext | None = None) -> ModelServer:
        """Serve on a free loopback port (HTTPS with `tls`)."""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                seen = Seen(*self._auth(), list(body.get("messages") or []), self.path)
                server.requests.append(seen)
                if not seen.authorized:
                    error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
                    return self._send(401, {"error": {**error, "code": "invalid_api_key"}})
                if urlsplit(self.path).path.rstrip("/") == "/v1/messages":  # Anthropic's Messages API
                    if body.get("stream"):  # what Claude Code asks for
                        return self._stream(_message(body, seen))
                    return self._send(200, _message(body, seen))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(
                        404, {"error": {"message": f"no route {self.path}", "type": "not_found"}}
                    )
                self._send(200, _completion(body, seen))

            def _auth(self) -> tuple[bool, str | None]:
                """OpenAI's `Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY` (as sent)."""
                if self.headers.get("x-api-key") is not None:
                    sent = self.headers.get("x-api-key")
                    return sent == server.key, f"x-api-key {sent}"
                auth = self.headers.get("Authorization")
                return auth == f"Bearer {server.key}", auth

            def do_GET(self) -> None:  # anything else: who is asking (the header checks use it)
                seen = Seen(*self._auth(), [], self.path)
                server.requests.append(seen)
                self._send(200, {"authorized": seen.authorized, "path": self.path})

            def _stream(self, message: dict[str, Any]) -> None:
                """The same message as the Messages API's server-sent events."""
                start = {**message, "content": [], "stop_reason": None}
                events = [
                    {"type": "message_start", "message": start},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": message["content"][0]["text"]}},
                    {"type": "content_block_stop", "index": 0},
                    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 1}},
                    {"type": "message_stop"},
                ]  # fmt: skip
                data = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def completions(self) -> list[Seen]:
        """The authorized chat requests, oldest first."""
        return [r for r in self.requests if r.authorized and r.path.rstrip("/") == "/v1/chat/completions"]

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _completion(body: dict[str, Any], seen: Seen) -> dict[str, Any]:
    messages = seen.messages
    turn = len(seen.users())
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        message: dict[str, Any] = {
            "role": "assistant",
            "content": f"turn {turn}: {str(last.get('content')).strip()}",
        }
        finish = "stop"
    else:
        cmd = f"echo 'turn {turn}' >> /home/user/notes.txt; wc -l < /home/user/notes.txt"
        call = {
            "id": f"call_{turn}",
            "type": "function",
            "function": {"name": "sh", "arguments": json.dumps({"cmd": cmd})},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{turn}-{len(messages)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": len(messages), "completion_tokens": 1, "total_tokens": len(messages) + 1},
    }


def _message(body: dict[str, Any], seen: Seen) -> dict[str, Any]:
    """A Messages API answer: `turn N` for the Nth user message."""
    return {
        "id": f"msg_{len(seen.messages)}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "scripted"),
        "content": [{"type": "text", "text": f"turn {len(seen.users())}"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": len(seen.messages), "output_tokens": 1},
    }
