"""What each notification says, per locale: Jinja templates under ``templates/<locale>/``.

A locale without its own templates falls back by language (``zh-TW`` -> ``zh-CN``), then to
``en``. Undefined variables are errors (``StrictUndefined``): a template that cannot be
filled is a bug to see in tests, not a blank greeting in someone's inbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from courier_common.events import Channel

LOCALES = ("en", "zh-CN")
DEFAULT_LOCALE = "en"
CHANNEL_LABELS: dict[str, dict[Channel, str]] = {
    "en": {"email": "email", "sms": "SMS", "push": "push notification"},
    "zh-CN": {"email": "电子邮件", "sms": "短信", "push": "推送通知"},
}


@dataclass(frozen=True, slots=True)
class EmailContent:
    subject: str
    text: str
    html: str
    locale: str


@dataclass(frozen=True, slots=True)
class ShortContent:
    """An SMS text, or a push title and body."""

    text: str
    title: str | None
    locale: str


def resolve_locale(requested: str) -> str:
    """The best locale we have templates for."""
    if requested in LOCALES:
        return requested
    language = requested.split("-", 1)[0].lower()
    for locale in LOCALES:
        if locale.split("-", 1)[0].lower() == language:
            return locale
    return DEFAULT_LOCALE


class Renderer:
    """Renders the named notification (``welcome``, ``channel_enabled``) for a locale."""

    def __init__(self) -> None:
        self._env = Environment(
            loader=PackageLoader("notification_service", "templates"),
            autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
            undefined=StrictUndefined,
            keep_trailing_newline=False,
            # Templates ship inside the package and never change while it runs: without
            # this, every render stats the template file to see whether to reload it.
            auto_reload=False,
        )

    def _render(self, locale: str, template: str, part: str, context: dict[str, Any]) -> str:
        return self._env.get_template(f"{locale}/{template}.{part}.j2").render(context).strip()

    def _context(self, locale: str, **values: Any) -> dict[str, Any]:
        labels = CHANNEL_LABELS[locale]
        context = dict(values)
        if "channels" in context:
            context["channels"] = [labels[c] for c in context["channels"]]
        if "channel" in context:
            context["channel_label"] = labels[context["channel"]]
        return context

    def email(self, template: str, requested_locale: str, **values: Any) -> EmailContent:
        locale = resolve_locale(requested_locale)
        context = self._context(locale, **values)
        return EmailContent(
            subject=self._render(locale, template, "subject", context),
            text=self._render(locale, template, "txt", context) + "\n",
            html=self._render(locale, template, "html", context) + "\n",
            locale=locale,
        )

    def sms(self, template: str, requested_locale: str, **values: Any) -> ShortContent:
        locale = resolve_locale(requested_locale)
        context = self._context(locale, **values)
        return ShortContent(self._render(locale, template, "sms", context), None, locale)

    def push(self, template: str, requested_locale: str, **values: Any) -> ShortContent:
        locale = resolve_locale(requested_locale)
        context = self._context(locale, **values)
        return ShortContent(
            text=self._render(locale, template, "push_body", context),
            title=self._render(locale, template, "push_title", context),
            locale=locale,
        )
