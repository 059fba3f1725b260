"""Flow parameter models as Prefect UI forms.

The Prefect UI draws a deployment's form from the stored JSON schema and orders fields by each
property's `position` (the schema's own key order does not survive PostgreSQL's JSONB), and it draws an
optional field (`anyOf: [string, null]`) as a type switch. `FormModel` writes `position` in declaration
order and gives optional text and number fields their plain type with no `null` default: an empty box
means "not set" (Prefect's schema validation lets a non-required property without a default be null).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def form_schema(schema: dict[str, Any], _model: type) -> None:
    """Give each property its declaration position; drop the `null` branch of optional fields."""
    for position, prop in enumerate(schema.get("properties", {}).values()):
        branches = prop.get("anyOf", [])
        plain = [b for b in branches if b.get("type") != "null"]
        if len(branches) == 2 and len(plain) == 1 and "$ref" not in plain[0]:
            del prop["anyOf"]
            prop.update(plain[0])
            if prop.get("default", ...) is None:
                del prop["default"]
        prop["position"] = position


class FormModel(BaseModel):
    """A flow's parameters: validated by pydantic, shown by the Prefect UI as an ordered form."""

    model_config = ConfigDict(json_schema_extra=form_schema)
