from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

admin.site.site_header = "tgpadmin"
admin.site.site_title = "tgpadmin"
admin.site.index_title = "Fleet updates"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
]
