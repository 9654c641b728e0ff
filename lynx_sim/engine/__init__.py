"""The discrete-event engine: closed-loop decode replay driven by simpy."""
