"""Programs the tests run in other processes: other users, namespaces, guests."""
