"""Paced live-stream users for locust (``locustfile.py``) and a headless runner (``run.py``)."""
