"""Release is sent without waiting for its answer (one round trip per lookup + release):
the daemon serves a session's requests in order, so whatever the client asks next finds
the lease ended, however many releases went out unanswered."""

from daemon_proc import device_pool, running_daemon
from daemon_worker import tokens


def test_unanswered_releases_are_done_before_the_next_request(tmp_path):
    with running_daemon(tmp_path) as daemon:
        client = daemon.client(device_pool(8, seed=3))
        try:
            prompt = tokens(5, 4)
            assert client.store(prompt, [0, 1, 2, 3]).num_new_pages == 4
            # More leases held at once than the client lets go unread (64): their
            # releases' replies pile up and are drained, never mistaken for answers.
            held = [client.lookup(prompt) for _ in range(150)]
            assert all(r.num_hit_pages == 4 for r in held)
            assert client.daemon_stats()["num_leases"] == 150
            for result in held:
                client.release(result)
            assert client.daemon_stats()["num_leases"] == 0   # the next request sees them ended
            again = client.lookup(prompt)
            assert again.num_hit_pages == 4 and client.daemon_stats()["num_leases"] == 1
            client.release(again)
            client.check_integrity(quiescent=True)
        finally:
            client.close()
        daemon.check_integrity(quiescent=True)
