"""The faces a person or program uses: the command line (cli), the web page (web, web_page, web_view,
web_catalog), the Python API (api), batches of prompts (batch) and the job queue behind the page and the API
(job_queue), and the command line's exit statuses.

May import every layer below: run, planning, pipeline, engines, loading, models, files and the root modules.
"""
