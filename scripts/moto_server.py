"""Runs moto's server with SQS deletes made atomic (the emulator for the tests).

moto removes a deleted message by rebuilding its queue's message list without the
lock that sends take. A send (or an SNS fan-out) that lands while a delete runs can
then vanish, and two deletes at once can bring a deleted message back. Real SQS does
neither, and a test that publishes while ferry drains would count the emulator's
losses as ferry's. Everything else is moto as published.
"""

import sys

from moto.sqs import models

_delete_message = models.Queue.delete_message


def _locked_delete_message(self, receipt_handle):
    with self._messages_lock:
        return _delete_message(self, receipt_handle)


models.Queue.delete_message = _locked_delete_message

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main(sys.argv[1:]))
