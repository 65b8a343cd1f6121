"""Pure decisions: requests and routing, worker lifecycles, supervision policies.  No asyncio, zmq or os; time is an argument."""
