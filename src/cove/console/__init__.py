"""The web console at /console (docs/console.md): server-rendered pages (Jinja2) and a small ES
module app that drives cove's public API (/v1) with the browser's session cookie.

A front end like e2b's: it reaches sandboxes only through the public API (the pages' scripts) and,
for the page shells, through the same control-plane verbs the API's routes call."""

from cove.console.routes import install

__all__ = ["install"]
