"""The machinery behind the entry points: the catalogue of tables and studies (their jobs), the one job
runner, the one report writer."""
