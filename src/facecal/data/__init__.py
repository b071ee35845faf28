"""Raw datasets: importers into the canonical layout, the synthetic default, validation."""
