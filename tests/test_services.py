"""
The throwaway servers of tests/services.py: they tell their own server from another on their
port (two test runs at once can be handed the same free port), and a kill ends every process.
"""

from __future__ import annotations

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.services import PostgresServer, RedisServer, process_running, shared_postgres, shared_redis


class OwnServerTests(SynchronousTestCase):
    def test_postgres_is_not_ready_on_another_servers_port(self) -> None:
        server = PostgresServer()
        self.addCleanup(server.destroy)
        server.port = shared_postgres().port
        self.assertFalse(server.ready())

    def test_redis_starts_on_another_port_when_its_own_is_taken(self) -> None:
        server = RedisServer()
        self.addCleanup(server.destroy)
        taken = shared_redis().port
        server.port = taken
        self.assertFalse(server.ready())
        server.start()  # its first process cannot listen, and exits
        self.assertNotEqual(server.port, taken)
        self.assertTrue(server.ready())

    def test_postgres_kill_leaves_no_backend(self) -> None:
        """
        A kill ends the backends too, which are sessions of their own: a backend left running
        can answer a query on a connection opened before the kill, and commit it.
        """
        server = PostgresServer()
        self.addCleanup(server.destroy)
        server.start()
        conn = psycopg2.connect(server.url)
        self.addCleanup(conn.close)
        backends = server.processes()
        self.assertGreater(len(backends), 1)
        server.kill()
        self.assertEqual([pid for pid in backends if process_running(pid)], [])
        with self.assertRaises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
