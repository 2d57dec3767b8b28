from gateway.states import ALLOWED, TERMINAL, State, can_transition


def test_terminal_states_are_final():
    for state in TERMINAL:
        assert ALLOWED[state] == frozenset()
        assert all(not can_transition(state, other) for other in State)


def test_every_state_has_a_rule_and_the_happy_path_is_allowed():
    assert set(ALLOWED) == set(State)
    path = [State.PENDING, State.SUBMITTING, State.QUEUED, State.RUNNING, State.SUCCEEDED]
    assert all(can_transition(a, b) for a, b in zip(path, path[1:]))


def test_nothing_skips_the_intent():
    assert not can_transition(State.PENDING, State.QUEUED)
    assert not can_transition(State.PENDING, State.RUNNING)
    assert can_transition(State.RUNNING, State.PENDING)  # retry
