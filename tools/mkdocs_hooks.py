"""MkDocs hook: add the pages generated from the code (components, recipe fields, strategies)."""

from __future__ import annotations

from mkdocs.structure.files import File


def on_files(files, config):
    from kdistill.core.registry import Registry
    from kdistill.docgen import component_pages, recipe_schema_page, strategy_pages

    registry = Registry.from_plugins()
    generated = {f"components/{name}": text for name, text in component_pages(registry).items()}
    generated.update({f"strategies/{name}": text for name, text in strategy_pages(registry).items()})
    generated["reference/recipe-fields.md"] = recipe_schema_page()
    for path, text in generated.items():
        files.append(File.generated(config, path, content=text))
    return files
