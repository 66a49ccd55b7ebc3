"""The faces a person or program uses: the command line (cli), the web page (web, web_page, web_view,
web_catalog), the Python API (api), batches of prompts (batch) and the job queue behind the page and the API
(job_queue), the command line's exit statuses, and planning for a card or a release this machine does not have
(plan_for).

May import every layer below: run, planning, pipeline, engines, loading, models, files and the root modules.
"""
