"""The field's evaluation protocols by name: settings and published anchors as data (`definitions/*.json`), a
runner that chains extract → heads → scores with them, and a page that puts our numbers beside the anchors."""
