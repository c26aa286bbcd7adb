"""``free_port``: ports for local servers come from below the kernel's ephemeral range (where no outgoing
connection's source port lands), never the same one twice in a row, and never one something is bound to."""
import socket

from workers.ops import devstack


def test_free_ports_are_outside_the_ephemeral_range_and_skip_a_bound_one(monkeypatch):
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = range(devstack.PORT_RANGE.start, devstack.PORT_RANGE.start + 3)
    monkeypatch.setattr(devstack, "PORT_RANGE", ports)
    first = devstack.free_port()
    taken_port = ports[(ports.index(first) + 1) % 3]  # the next one in the walk is bound by someone else
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", taken_port))
        taken.listen()
        second = devstack.free_port()
    assert len({first, second, taken_port}) == 3
    assert all(port in ports and port < ephemeral_low for port in (first, second))
