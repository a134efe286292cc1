"""batchrunner: run very large batches of chat-completion requests against OpenAI-style APIs."""

from __future__ import annotations

__version__ = "0.1.0"
