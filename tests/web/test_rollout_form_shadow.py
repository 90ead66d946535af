"""The dashboard's rollout form asks for a shadow gated on the derived version's parent (forms only; the check
itself runs on real processes in tests/jobs/test_derive_shadow.py)."""

from __future__ import annotations

from controller.web import forms


def test_the_form_passes_shadow_against_parent_and_marks_a_bad_value() -> None:
    base = {"ref": "tiny@2", "selector": "role=shadow", "shadow": "1"}
    body = forms.to_rollout(forms.values_from({**base, "shadow_against": "parent"}))
    assert body.shadow is not None and body.shadow.against == "parent"
    assert forms.to_rollout(forms.values_from(base)).shadow.against == "active"  # type: ignore[union-attr]
    try:
        forms.to_rollout(forms.values_from({**base, "shadow_against": "grandparent"}))
    except forms.FormError as exc:
        assert "shadow_against" in exc.errors, exc.errors
    else:
        raise AssertionError("an unknown shadow_against was accepted")
