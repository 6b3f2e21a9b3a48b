"""Templates per locale, with fallbacks; HTML is escaped, text is not."""

from __future__ import annotations

import pytest

from notification_service.rendering import Renderer, resolve_locale


@pytest.mark.parametrize(
    ("requested", "resolved"),
    [("en", "en"), ("zh-CN", "zh-CN"), ("zh-TW", "zh-CN"), ("en-GB", "en"), ("fr", "en")],
)
def test_locale_fallbacks(requested: str, resolved: str) -> None:
    assert resolve_locale(requested) == resolved


def test_welcome_email_in_english_and_chinese() -> None:
    renderer = Renderer()
    en = renderer.email("welcome", "en", name="Ada", channels=["email", "sms"], channel="email")
    assert en.subject == "Welcome to Courier, Ada"
    assert "You will hear from us by email, SMS." in en.text
    assert "<strong>Courier</strong>" in en.html
    zh = renderer.email("welcome", "zh-CN", name="李雷", channels=["email"], channel="email")
    assert zh.subject == "欢迎加入 Courier，李雷"
    assert "通过电子邮件与您联系" in zh.text
    assert zh.locale == "zh-CN"


def test_names_are_escaped_in_html_only() -> None:
    content = Renderer().email(
        "welcome", "en", name="<script>x</script>", channels=["email"], channel="email"
    )
    assert "<script>" not in content.html
    assert "&lt;script&gt;" in content.html
    assert "<script>x</script>" in content.text


def test_sms_and_push_texts() -> None:
    renderer = Renderer()
    sms = renderer.sms("welcome", "zh-CN", name="Ada", channels=["sms"], channel="sms")
    assert sms.text.startswith("Ada，您好")
    push = renderer.push("channel_enabled", "en", name="Ada", channels=["push"], channel="push")
    assert push.title == "Notifications are on"
    assert push.text == "Hi Ada, Courier will now reach you here."
