"""Programs the tests run in other processes (other users, namespaces), and the doubles they use."""
