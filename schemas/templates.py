"""Prompt templates: Jinja2 in a sandbox with StrictUndefined.

A spec is data from a git repo, not trusted code: the sandbox refuses attribute
tricks like `{{ ''.__class__.__mro__ }}`, and StrictUndefined makes a typo'd
variable an error instead of an empty string in a nightly batch.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_VARIABLES = ("character", "name", "description", "trigger", "scene", "vars")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=4096)
def _compile(template: str):
    return _environment().from_string(template)


class PromptTemplateError(ValueError):
    pass


def render_prompt(template: str, variables: dict[str, str]) -> str:
    """Render a scene prompt; raise PromptTemplateError with a teaching message."""
    try:
        return _compile(template).render(**variables)
    except TemplateError as exc:
        name = type(exc).__name__
        detail = str(exc)
        if name == "UndefinedError":
            detail += f"; available variables: {', '.join(TEMPLATE_VARIABLES)} and the spec's `vars`"
        elif name == "SecurityError":
            detail = f"unsafe template operation refused by the sandbox: {detail}"
        raise PromptTemplateError(f"prompt template error ({name}): {detail}") from None


def prompt_variables(character_name: str | None, description: str, trigger_words: list[str], scene: str,
                     variables: dict[str, str] | None = None) -> dict:
    """The variables a scene template sees. `character` = trigger words + description; each prompt
    variable (`vars:`) as `{{ NAME }}` and `{{ vars.NAME }}` (validation refuses a var named like a
    built-in variable, so the two spellings never disagree)."""
    trigger = ", ".join(trigger_words)
    character = ", ".join(part for part in (trigger, description) if part)
    own = dict(variables or {})
    return {
        **own,
        "vars": own,
        "character": character,
        "name": character_name or "",
        "description": description,
        "trigger": trigger,
        "scene": scene,
    }
