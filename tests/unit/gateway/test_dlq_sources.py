"""The dlq query lists the gateway's own dead letters once, from here when it keeps them itself."""

from __future__ import annotations

from kinshasa.gateway.dlq_sources import asks_backends, keeps_backend_answer, reads_here, reprocesses_here


def test_a_gateway_with_its_own_queue_lists_it_here_and_never_again_from_a_backend() -> None:
    assert reads_here(True, None) and asks_backends(True, None)
    assert not keeps_backend_answer(True, "gateway")
    assert keeps_backend_answer(True, "coordinator")


def test_asking_for_the_gateway_alone_asks_no_backend() -> None:
    assert reads_here(True, "gateway")
    assert not asks_backends(True, "gateway")


def test_another_component_is_asked_through_its_backend() -> None:
    assert not reads_here(True, "coordinator")
    assert asks_backends(True, "coordinator")


def test_a_gateway_without_its_own_queue_asks_the_backends_for_everything() -> None:
    for component in (None, "gateway", "coordinator"):
        assert not reads_here(False, component)
        assert asks_backends(False, component)
    assert keeps_backend_answer(False, "gateway")


def test_only_the_gateways_own_dead_letters_are_reprocessed_here() -> None:
    assert reprocesses_here(True, "gateway")
    assert not reprocesses_here(False, "gateway")
    assert not reprocesses_here(True, "coordinator")
