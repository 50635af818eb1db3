"""Prompt templates: a name, the text, and a hash of the text that goes into provenance."""

from __future__ import annotations

from dataclasses import dataclass

from synth.llm.types import GenerationParams, LLMRequest
from synth.records import template_hash


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    id: str
    user: str
    system: str = ""

    @property
    def hash(self) -> str:
        return template_hash(self.id, self.system, self.user)

    def request(
        self, params: GenerationParams, json_schema: dict | None = None, **fields: str
    ) -> LLMRequest:
        try:
            user = self.user.format(**fields)
        except KeyError as e:
            raise KeyError(f"template {self.id!r} needs field {e.args[0]!r}") from None
        return LLMRequest.chat(user, self.system or None, params, json_schema, template_id=self.id)


def clean_message(text: str) -> str:
    """An LLM-written message without a label or quotes around it."""
    text = text.strip()
    for prefix in ("Rewritten message:", "Message:", "message:", "User:", "Here is the message:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return text.strip('"').strip()
