"""The signup example: a welcome email, a webhook call and a report that fails now and then."""
