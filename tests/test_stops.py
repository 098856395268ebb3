from server.engine.stops import StopMatcher


def feed(matcher, pieces):
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            break
    return "".join(out), stopped


def test_stop_string_split_across_pieces_is_never_emitted():
    matcher = StopMatcher(["END"])
    text, stopped = feed(matcher, ["Hello E", "N", "D and more"])
    assert (text, stopped) == ("Hello ", True)


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["END"])
    assert matcher.push("an EN") == ("an ", False)
    assert matcher.push("ough") == ("ENough", False)


def test_earliest_of_several_stops_wins_and_flush_returns_held_text():
    matcher = StopMatcher(["\n\n", "###"])
    assert matcher.push("a ### b\n\nc") == ("a ", True)
    matcher = StopMatcher(["###"])
    assert matcher.push("x ##") == ("x ", False)
    assert matcher.flush() == "##"


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""
