"""sqlalchemy-eventbroker."""
