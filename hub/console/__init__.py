"""The operator console: a Textual control-room application over the broker.

It talks to the hub only through the broker, as an operator (hub/opclient.py): a
snapshot on request, then signed deltas (hub/views.py). Nothing here opens the hub's
database, so it runs on any machine that reaches the broker. docs/console.md is the
user's guide.

- model.py     the console's copy of the view (pure): snapshots, deltas, seq gaps
- session.py   the link: connect, whoami, snapshot, follow, reconnect
- app.py       the Textual app; screens.py the screens; modals.py the confirmations
- synthetic.py a hub played from data (snapshot tests, benchmark)
- cli.py       ``fieldtwin console``
"""
