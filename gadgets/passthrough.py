"""A pass-through gadget: every message it receives goes back unchanged (protocol benchmarks and tests)."""


def passthrough(connection) -> None:
    """``<execute name="gadgets.passthrough" target="passthrough" type="python"/>``"""
    for item in connection:
        connection.send(item)
