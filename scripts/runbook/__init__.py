"""One command per incident: read-only diagnosis by default, safe fixes only behind --fix (see README, "Operations")."""
