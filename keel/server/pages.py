"""The two HTML pages: a landing page at `/` and, with `--enable-docs`, API docs at `/docs`.

Both are plain server-rendered HTML with no script and nothing loaded from elsewhere, so they work on
a machine without internet access (FastAPI's own /docs loads Swagger UI from a CDN and is blank there).
"""

from __future__ import annotations

import json
from html import escape

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
          "code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}pre{padding:.6rem;overflow:auto}"
          "h2{margin-top:2rem;border-bottom:1px solid #ddd}.m{font-weight:bold;display:inline-block;width:4rem}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def landing(version: str, models: list[str], docs: bool, key_required: bool) -> str:
    links = [("/v1/models", "the models served (JSON)"), ("/health", "health"), ("/metrics", "Prometheus metrics")]
    if docs:
        links.insert(0, ("/docs", "API reference"))
    items = "".join(f"<li><a href='{href}'>{href}</a>: {what}</li>" for href, what in links)
    served = "".join(f"<li><code>{escape(m)}</code></li>" for m in models)
    auth = ("<p>Requests to <code>/v1</code> need <code>Authorization: Bearer &lt;key&gt;</code>.</p>"
            if key_required else "")
    example = ("from openai import OpenAI\n"
               "client = OpenAI(base_url=\"&lt;this server&gt;/v1\", api_key=\"...\")\n"
               f"client.chat.completions.create(model=\"{escape(models[0])}\", max_tokens=64,\n"
               "    messages=[{\"role\": \"user\", \"content\": \"Hello!\"}])")
    return _page("keel", f"<h1>keel {escape(version)}</h1><p>An OpenAI-compatible server for open models.</p>"
                         f"<h2>Models</h2><ul>{served}</ul>{auth}<h2>Use it</h2><pre>{example}</pre>"
                         f"<h2>Links</h2><ul>{items}</ul>")


def api_docs(spec: dict) -> str:
    """Every operation of an OpenAPI document: method, path, summary, request body schema."""
    schemas = spec.get("components", {}).get("schemas", {})
    parts = [f"<h1>{escape(spec.get('info', {}).get('title', 'API'))} "
             f"{escape(str(spec.get('info', {}).get('version', '')))}</h1>"
             "<p>The machine-readable version: <a href='/openapi.json'>/openapi.json</a>. Bodies are JSON; "
             "errors come as <code>{\"error\": {\"message\", \"type\", \"param\", \"code\"}}</code>.</p>"]
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            parts.append(f"<h2><span class='m'>{escape(method.upper())}</span> <code>{escape(path)}</code></h2>")
            text = op.get("description") or op.get("summary") or ""
            if text:
                parts.append(f"<p>{escape(text)}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                ref = body.get("$ref", "")
                shown = schemas.get(ref.rsplit("/", 1)[-1], body) if ref else body
                parts.append(f"<pre>{escape(json.dumps(shown, indent=2)[:20000])}</pre>")
    return _page("API reference", "".join(parts))
